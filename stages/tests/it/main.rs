//! The stage kinds' integration tests, in one binary (one link of candle and the whole stack
//! instead of one per file): each kind on real files or real SmolLM2 weights, the judges and
//! their faults, the model sources, and plan-time checks. Shared fixtures (a stage context
//! over temporary folders, typed inputs, prompts) live in `support`. A new topic is a file
//! here plus a `mod` line below.

mod command_run;
mod contrast_margin;
mod dataset_ops;
mod dataset_prompts;
mod dataset_questions;
mod eval_provenance;
mod eval_smollm2;
mod faults_judge;
mod fidelity;
mod judge_exact;
mod kind_params;
mod persona_steering;
mod plan_checks;
mod report_browser;
mod report_html;
mod rl_grader;
mod rl_onpolicy;
mod rl_resume;
mod safety_smollm2;
mod serve_openai;
mod serve_stream;
mod sft_smollm2;
mod snapshot_curve;
mod support;
mod text_fetch;
mod training_logs;
