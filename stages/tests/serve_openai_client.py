"""Drives `emflow serve` with the official `openai` Python client: what a researcher's
script would do. Run by stages' serve tests: `python3 serve_openai_client.py BASE_URL MODEL`.
Each check prints one line; any failure raises, and the exit status says so."""

import sys

import openai

base_url, model = sys.argv[1], sys.argv[2]
client = openai.OpenAI(base_url=base_url, api_key="unused", max_retries=0, timeout=120)
say = [{"role": "user", "content": "Name one colour."}]


def check(name, ok, detail=""):
    if not ok:
        raise AssertionError(f"{name}: {detail}")
    print(f"ok {name}")


# Models: the served id, with `created` and `owned_by`.
models = client.models.list().data
check("models", [m.id for m in models] == [model] and models[0].created > 0
      and models[0].owned_by == "emflow", models)
check("model by id", client.models.retrieve(model).id == model)

# Chat: an answer, usage, and the same text again with the same seed.
a = client.chat.completions.create(model=model, messages=say, max_tokens=12, temperature=1.0, seed=11)
b = client.chat.completions.create(model=model, messages=say, max_tokens=12, temperature=1.0, seed=11)
check("chat", a.choices[0].message.role == "assistant" and a.usage.completion_tokens > 0, a)
check("seed repeats", a.choices[0].message.content == b.choices[0].message.content)
# No seed: fresh samples (five unseeded answers at temperature 1 are not all the same).
free = {client.chat.completions.create(model=model, messages=say, max_tokens=12, temperature=1.0)
        .choices[0].message.content for _ in range(5)}
check("no seed, fresh samples", len(free) > 1, free)

# n choices in one request.
many = client.chat.completions.create(model=model, messages=say, max_tokens=8, n=3, seed=5)
check("n=3", [c.index for c in many.choices] == [0, 1, 2], many.choices)

# Logprobs: one entry per token, `top_logprobs` sorted, bytes that spell the token.
lp = client.chat.completions.create(model=model, messages=say, max_tokens=6, temperature=0,
                                    logprobs=True, top_logprobs=4)
content = lp.choices[0].logprobs.content
check("chat logprobs", len(content) == lp.usage.completion_tokens
      and len(content[0].top_logprobs) == 4
      and content[0].top_logprobs[0].logprob >= content[0].top_logprobs[-1].logprob, content[:1])
check("logprob bytes", all(bytes(e.bytes).decode("utf-8", "replace") == e.token for e in content))

# Streaming: chunks whose deltas join to the same text as the whole answer (greedy).
whole = client.chat.completions.create(model=model, messages=say, max_tokens=16, temperature=0)
chunks = list(client.chat.completions.create(model=model, messages=say, max_tokens=16, temperature=0,
                                             stream=True, stream_options={"include_usage": True}))
text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
check("chat stream", text == whole.choices[0].message.content, (text, whole.choices[0].message.content))
check("stream finish", [c.choices[0].finish_reason for c in chunks if c.choices][-1]
      == whole.choices[0].finish_reason)
check("stream usage", chunks[-1].usage is not None
      and chunks[-1].usage.completion_tokens == whole.usage.completion_tokens, chunks[-1])

# Completions: a raw prompt, legacy logprobs, streaming.
c = client.completions.create(model=model, prompt="The capital of France is", max_tokens=5,
                              temperature=0, logprobs=2)
check("completions", c.object == "text_completion" and len(c.choices[0].text) > 0, c)
check("completions logprobs", len(c.choices[0].logprobs.tokens) == c.usage.completion_tokens
      and all(len(t) <= 2 for t in c.choices[0].logprobs.top_logprobs), c.choices[0].logprobs)
streamed = "".join(x.choices[0].text for x in client.completions.create(
    model=model, prompt="The capital of France is", max_tokens=5, temperature=0, stream=True) if x.choices)
check("completions stream", streamed == c.choices[0].text, (streamed, c.choices[0].text))


# Errors: OpenAI's exceptions, with the field named.
def refused(name, status, param=None, code=None, **kw):
    try:
        client.chat.completions.create(**{"model": model, "messages": say, "max_tokens": 4, **kw})
    except openai.APIStatusError as e:
        err = e.body if isinstance(e.body, dict) else {}
        check(name, e.status_code == status and (param is None or err.get("param") == param)
              and (code is None or err.get("code") == code), (e.status_code, err))
        return
    raise AssertionError(f"{name}: accepted")


refused("negative temperature", 400, param="temperature", temperature=-0.5)
refused("top_p above 1", 400, param="top_p", top_p=1.5)
refused("n = 0", 400, param="n", n=0)
refused("unknown model", 400, param="model", code="model_not_found", model="gpt-nothing")
long_prompt = [{"role": "user", "content": "word " * 100_000}]
refused("prompt over the context", 400, code="context_length_exceeded", messages=long_prompt)
try:
    client.post("/nowhere", cast_to=object, body={})
    raise AssertionError("unknown route: accepted")
except openai.NotFoundError:
    check("unknown route", True)
print("all checks passed")
