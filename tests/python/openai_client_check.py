"""Drives a running node with the official OpenAI Python client, unchanged.

Usage: openai_client_check.py BASE_URL TOKEN [CA_FILE]
With CA_FILE (an https BASE_URL), the client verifies the node's certificate against it, as a
user of a node with a self-signed certificate would.
Exits non-zero (with the reason) when anything a client relies on does not hold.
"""
import ssl
import sys

import openai

base_url, token = sys.argv[1], sys.argv[2]
http = {}
if len(sys.argv) > 3:
    # The client's own default HTTP client class (httpx or its successor), verifying with
    # the given CA file only.
    make = getattr(openai, "DefaultHttpx2Client", None) or openai.DefaultHttpxClient
    http = {"http_client": make(verify=ssl.create_default_context(cafile=sys.argv[3]))}
client = openai.OpenAI(base_url=base_url, api_key=token, max_retries=0, timeout=60, **http)

models = client.models.list()
ids = [m.id for m in models.data]
assert len(ids) == 1 and ids[0].startswith("neurollm-"), ids
model = ids[0]

c = client.completions.create(model=model, prompt="The river", max_tokens=12, temperature=0, seed=3)
assert c.object == "text_completion", c
assert c.choices[0].finish_reason in ("stop", "length"), c
assert c.usage.completion_tokens <= 12 and c.usage.prompt_tokens > 0, c.usage
greedy = c.choices[0].text

pieces = []
finish = None
for chunk in client.completions.create(model=model, prompt="The river", max_tokens=12, temperature=0, stream=True):
    if chunk.choices:
        pieces.append(chunk.choices[0].text)
        finish = chunk.choices[0].finish_reason or finish
# The node trains between decode steps, so the weights (and the greedy text) may change
# between the two requests: check the stream's shape, not equality with the first answer.
streamed = "".join(pieces)
assert isinstance(streamed, str) and len(pieces) >= 1, pieces
assert finish in ("stop", "length"), finish

chat = client.chat.completions.create(
    model=model,
    messages=[{"role": "system", "content": "You tell stories."}, {"role": "user", "content": "Tell me about the sea."}],
    max_tokens=16,
    temperature=0.7,
    seed=5,
)
assert chat.choices[0].message.role == "assistant", chat
assert isinstance(chat.choices[0].message.content, str), chat
assert chat.usage.total_tokens == chat.usage.prompt_tokens + chat.usage.completion_tokens

deltas = []
for chunk in client.chat.completions.create(
    model=model, messages=[{"role": "user", "content": "Hello"}], max_tokens=8, stream=True, seed=5
):
    if chunk.choices and chunk.choices[0].delta.content:
        deltas.append(chunk.choices[0].delta.content)

try:
    openai.OpenAI(base_url=base_url, api_key="nst_wrong", max_retries=0, **http).models.list()
    raise SystemExit("a wrong key was accepted")
except openai.AuthenticationError:
    pass

try:
    client.completions.create(model=model, prompt="x", max_tokens=4, temperature=5)
    raise SystemExit("temperature 5 was accepted")
except openai.BadRequestError:
    pass

print(f"ok: {model}, greedy {greedy!r}, chat {chat.choices[0].message.content!r}, {len(deltas)} chat deltas")
