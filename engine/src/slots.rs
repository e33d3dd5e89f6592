//! Resource slots for running stages at once: a job count, CPU cores and GPU ids.
//!
//! CPUs are a budget (a stage asking for more cores than exist still runs, alone); GPUs
//! are distinct ids handed out and returned, so two stages never share a device. A stage
//! asking for more GPUs than are visible is refused before anything runs.

use crate::job::JobDevice;
use crate::pipeline::Resources;

pub struct Slots {
    max_jobs: usize,
    total_cpus: usize,
    running: usize,
    cpus_used: usize,
    /// Free GPU ids (entries of the driver's `CUDA_VISIBLE_DEVICES`), with their ordinal.
    free_gpus: Vec<(usize, String)>,
    total_gpus: usize,
}

/// What one running stage holds.
#[derive(Clone, Debug)]
pub struct Allocation {
    pub cpus: usize,
    pub gpus: Vec<(usize, String)>,
}

impl Allocation {
    pub fn device(&self) -> JobDevice {
        match self.gpus.first() {
            Some((ordinal, _)) => JobDevice::Cuda { ordinal: *ordinal },
            None => JobDevice::Cpu,
        }
    }

    pub fn gpu_ids(&self) -> Vec<String> {
        self.gpus.iter().map(|(_, id)| id.clone()).collect()
    }
}

impl Slots {
    pub fn new(max_jobs: usize, total_cpus: usize, gpu_ids: Vec<String>) -> Self {
        let total_gpus = gpu_ids.len();
        Slots {
            max_jobs: max_jobs.max(1),
            total_cpus: total_cpus.max(1),
            running: 0,
            cpus_used: 0,
            free_gpus: gpu_ids.into_iter().enumerate().collect(),
            total_gpus,
        }
    }

    pub fn total_gpus(&self) -> usize {
        self.total_gpus
    }

    /// Takes slots for a stage with `resources`, if they are free now.
    pub fn try_take(&mut self, resources: &Resources) -> Option<Allocation> {
        let cpus = (resources.cpus.max(1) as usize).min(self.total_cpus);
        let gpus = resources.gpus as usize;
        if self.running >= self.max_jobs || gpus > self.free_gpus.len() {
            return None;
        }
        if self.running > 0 && self.cpus_used + cpus > self.total_cpus {
            return None;
        }
        self.running += 1;
        self.cpus_used += cpus;
        let taken = self.free_gpus.drain(..gpus).collect();
        Some(Allocation { cpus, gpus: taken })
    }

    pub fn give_back(&mut self, alloc: Allocation) {
        self.running -= 1;
        self.cpus_used -= alloc.cpus;
        self.free_gpus.extend(alloc.gpus);
        self.free_gpus.sort();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn res(cpus: u32, gpus: u32) -> Resources {
        Resources {
            cpus,
            gpus,
            ..Resources::default()
        }
    }

    #[test]
    fn gpus_are_distinct_and_returned() {
        let mut slots = Slots::new(8, 8, vec!["3".into(), "5".into()]);
        let a = slots.try_take(&res(1, 1)).unwrap();
        let b = slots.try_take(&res(1, 1)).unwrap();
        assert_eq!(
            (a.gpu_ids(), b.gpu_ids()),
            (vec!["3".to_string()], vec!["5".to_string()])
        );
        assert_eq!(b.device(), JobDevice::Cuda { ordinal: 1 });
        assert!(slots.try_take(&res(1, 1)).is_none());
        assert!(slots.try_take(&res(1, 0)).is_some());
        slots.give_back(a);
        assert_eq!(
            slots.try_take(&res(1, 1)).unwrap().device(),
            JobDevice::Cuda { ordinal: 0 }
        );
    }

    #[test]
    fn cpu_budget_and_job_count() {
        let mut slots = Slots::new(3, 4, vec![]);
        let big = slots.try_take(&res(16, 0)).unwrap();
        assert_eq!(big.cpus, 4);
        assert!(slots.try_take(&res(1, 0)).is_none());
        slots.give_back(big);
        let _a = slots.try_take(&res(1, 0)).unwrap();
        let _b = slots.try_take(&res(1, 0)).unwrap();
        let _c = slots.try_take(&res(1, 0)).unwrap();
        assert!(slots.try_take(&res(1, 0)).is_none(), "job count caps at 3");
    }
}
