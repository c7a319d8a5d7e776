"""llmjax-server (serving/go) driven by the official `openai` client.

One server runs for the module on 127.0.0.1 at a free port over a cpu-only
export of conftest's tiny run (output width 40, batch buckets 1, 4, 16; 16
rows decoded together, 16 requests queued); it is always stopped. Its
answers are checked against JAX: greedy text against
`python -m llm_jax.generate`, seeded samples and log-probabilities against
llm_jax.inference.decode. A load test, a battery of bad requests and a
graceful shutdown close the module.
"""

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request

import jax
import numpy as np
import pytest

openai = pytest.importorskip('openai')

from llm_jax.inference import decode  # noqa: E402  (after the skip)

pytestmark = [
    pytest.mark.slow,  # Exports, builds and starts a server: about a minute.
    pytest.mark.skipif(shutil.which('go') is None, reason='Go is not installed'),
]

WIDTH = 40  # The export's max_new_tokens.
NAME = 'tiny'


def _start(go_build, model_dir, *flags, timeout=180):
  """(process, 'host:port') of a server on a free loopback port."""
  # stderr goes to a file: a pipe nobody reads could fill and stall the server.
  log = tempfile.TemporaryFile(mode='w+')
  proc = subprocess.Popen(
      [os.path.join(go_build['bin'], 'llmjax-server'), '-model', model_dir,
       '-addr', '127.0.0.1:0', '-model_name', NAME, *flags],
      stdout=subprocess.PIPE, stderr=log, text=True)
  proc.log = log
  found = []

  def read_address():
    for line in proc.stdout:
      if line.startswith('listening on '):
        found.append(line.split()[-1])
        return

  reader = threading.Thread(target=read_address, daemon=True)
  reader.start()
  reader.join(timeout)
  if not found:
    proc.kill()
    raise AssertionError('the server did not start: ' + _stop(proc)[1][-3000:])
  return proc, found[0]


def _stop(proc) -> tuple[int, str]:
  """SIGTERM, then the exit status and stderr (killed if it hangs)."""
  if proc.poll() is None:
    proc.send_signal(signal.SIGTERM)
  try:
    proc.wait(timeout=60)
  except subprocess.TimeoutExpired:
    proc.kill()
    proc.wait()
  proc.log.seek(0)
  return proc.returncode, proc.log.read()


@pytest.fixture(scope='module')
def export_dir(exported_tiny_run, tmp_path_factory):
  from llm_jax.deploy import saved_model  # pylint: disable=g-import-not-at-top
  run, _, _ = exported_tiny_run
  out = str(tmp_path_factory.mktemp('served') / '1')
  saved_model.export(run.workdir, out, max_new_tokens=WIDTH, batch_buckets=(1, 4, 16),
                     platforms=('cpu',), log=lambda *_: None)
  return out


@pytest.fixture(scope='module')
def server(go_build, export_dir):
  proc, addr = _start(go_build, export_dir, '-max_batch', '16', '-queue', '16')
  yield addr
  code, err = _stop(proc)
  assert code == 0, err[-3000:]


@pytest.fixture(scope='module')
def client(server):
  return openai.OpenAI(base_url=f'http://{server}/v1', api_key='none', max_retries=0,
                       timeout=120)


def _greedy_cli(run, prompts, max_new_tokens):
  """Continuations `python -m llm_jax.generate` prints for greedy decoding."""
  args = [sys.executable, '-m', 'llm_jax.generate', f'--workdir={run.workdir}',
          f'--max_new_tokens={max_new_tokens}', '--temperature=0']
  proc = subprocess.run(args + [f'--prompt={p}' for p in prompts], capture_output=True,
                        text=True, timeout=300, env={**os.environ, 'PYTHONPATH': os.getcwd()})
  assert proc.returncode == 0, proc.stderr[-3000:]
  parts = re.split(r'^--- prompt \d+\n', proc.stdout, flags=re.M)[1:]
  assert len(parts) == len(prompts), proc.stdout
  return [part[len(p):-1] for part, p in zip(parts, prompts)]  # print's newline off.


def test_greedy_completions_equal_python_generate(client, exported_tiny_run):
  run, _, _ = exported_tiny_run
  prompts = ['def main(', 'import os\nclass Thing:']
  got = client.completions.create(model=NAME, prompt=prompts, max_tokens=20, temperature=0)
  assert [c.text for c in got.choices] == _greedy_cli(run, prompts, 20)
  assert got.object == 'text_completion' and got.model == NAME
  assert got.usage.prompt_tokens == sum(len(run.tokenizer.encode(p)) for p in prompts)


def test_seeded_choices_equal_jax_and_repeat(client, exported_tiny_run):
  run, _, _ = exported_tiny_run
  tok = run.tokenizer
  kw = dict(model=NAME, prompt='for i in range(', max_tokens=16, temperature=0.9, top_p=0.95)
  got = client.completions.create(n=3, seed=11, **kw)
  # Choice c draws as row c of a batch does in JAX, whatever else shares the step.
  ids = tok.encode(kw['prompt'])
  want, counts = decode.generate_for_run(run, [ids] * 3, max_new_tokens=16, width=16,
                                         temperature=0.9, top_p=0.95, seed=11)
  texts = [c.text for c in got.choices]
  assert texts == [tok.decode(w[:n]) for w, n in zip(want, counts)]
  assert len(set(texts)) > 1  # The choices are different samples.
  assert [c.text for c in client.completions.create(n=3, seed=11, **kw).choices] == texts
  other = [c.text for c in client.completions.create(n=3, seed=12, **kw).choices]
  assert other != texts


def _chat_prompt(run, messages):
  """The tokens the server renders for a conversation (llm_jax/data/sft.py's pieces)."""
  template = run.config.sft.template
  ids = []
  for m in messages + [{'role': 'assistant', 'content': None}]:
    head, tail = template.replace('{role}', m['role']).split('{content}')
    ids += run.tokenizer.encode(head)
    if m['content'] is not None:
      ids += run.tokenizer.encode(m['content'] + tail)
  return ids


def test_chat_renders_the_template_and_streams_the_same_text(client, exported_tiny_run):
  run, _, _ = exported_tiny_run
  messages = [{'role': 'system', 'content': 'You write Python.'},
              {'role': 'user', 'content': 'What is a list?'}]
  kw = dict(model=NAME, messages=messages, max_tokens=12, temperature=0.8, seed=5)
  got = client.chat.completions.create(**kw)
  ids = _chat_prompt(run, messages)
  want, count = decode.generate_for_run(run, [ids], max_new_tokens=12, width=12,
                                        temperature=0.8, seed=5)
  assert got.choices[0].message.role == 'assistant'
  assert got.choices[0].message.content == run.tokenizer.decode(want[0][:count[0]])
  assert got.usage.prompt_tokens == len(ids)
  chunks = list(client.chat.completions.create(stream=True, **kw))
  assert chunks[0].choices[0].delta.role == 'assistant'
  assert ''.join(c.choices[0].delta.content or '' for c in chunks) == got.choices[0].message.content
  assert chunks[-1].choices[0].finish_reason == got.choices[0].finish_reason


def test_stream_chunks_arrive_before_the_request_ends(client):
  t0 = time.perf_counter()
  arrivals, text = [], ''
  for chunk in client.completions.create(model=NAME, prompt='def main(', max_tokens=WIDTH,
                                         temperature=0, stream=True):
    arrivals.append(time.perf_counter() - t0)
    text += chunk.choices[0].text
  total = time.perf_counter() - t0
  whole = client.completions.create(model=NAME, prompt='def main(', max_tokens=WIDTH,
                                    temperature=0)
  assert text == whole.choices[0].text
  assert len(arrivals) >= 10, arrivals
  assert arrivals[0] < 0.5 * total, (arrivals[0], total)


def test_logprobs_and_echo_equal_jax_scores(client, exported_tiny_run):
  run, _, _ = exported_tiny_run
  tok = run.tokenizer
  prompt = 'import os\nclass Thing:'
  got = client.completions.create(model=NAME, prompt=prompt, max_tokens=6, temperature=0,
                                  logprobs=3, echo=True)
  c = got.choices[0]
  ids = tok.encode(prompt)
  new, count = decode.generate_for_run(run, [ids], max_new_tokens=6, width=6)
  new = new[0][:count[0]].tolist()
  assert c.text == prompt + tok.decode(new)
  lp = c.logprobs
  assert len(lp.tokens) == len(ids) + len(new)
  assert ''.join(lp.tokens) == tok.decode(ids) + tok.decode(new)
  assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
  # Every log-probability is the one teacher forcing gives in JAX.
  seq = np.array([ids + new], np.int32)
  want = jax.jit(decode.score, static_argnames='graphdef')(run.params, seq,
                                                           graphdef=run.graphdef)
  np.testing.assert_allclose(lp.token_logprobs[1:], np.asarray(want['logprobs'])[0, 1:],
                             atol=2e-3)
  for top, best in zip(lp.top_logprobs[len(ids):], np.asarray(want['top_logprobs'])[0, len(ids):]):
    assert len(top) == 3 and max(top.values()) == pytest.approx(best[0], abs=2e-3)
  assert lp.text_offset[len(ids)] == len(prompt)
  scored = client.completions.create(model=NAME, prompt=prompt, max_tokens=0, echo=True,
                                     logprobs=0)
  assert scored.choices[0].text == prompt and scored.usage.completion_tokens == 0
  np.testing.assert_allclose(scored.choices[0].logprobs.token_logprobs[1:],
                             lp.token_logprobs[1:len(ids)], atol=1e-5)


def test_stop_strings_cut_the_text(client):
  whole = client.completions.create(model=NAME, prompt='x = [', max_tokens=WIDTH,
                                    temperature=0.9, seed=3).choices[0].text
  middle = range(len(whole) // 2, len(whole) - 1)
  stop = next(whole[i:i + 2] for i in middle if whole[i:i + 2].strip())
  got = client.completions.create(model=NAME, prompt='x = [', max_tokens=WIDTH,
                                  temperature=0.9, seed=3, stop=[stop])
  assert got.choices[0].text == whole[:whole.index(stop)]
  assert got.choices[0].finish_reason == 'stop'
  streamed = ''.join(c.choices[0].text for c in client.completions.create(
      model=NAME, prompt='x = [', max_tokens=WIDTH, temperature=0.9, seed=3, stop=[stop],
      stream=True))
  assert streamed == got.choices[0].text


def _load(go_build, server, clients, requests):
  body = json.dumps(dict(model=NAME, prompt='def main(', max_tokens=32, temperature=0))
  proc = subprocess.run(
      [os.path.join(go_build['bin'], 'llmjax-load'), '-url', f'http://{server}/v1/completions',
       '-clients', str(clients), '-requests', str(requests), '-body', body],
      capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr
  return json.loads(proc.stdout)


def test_concurrent_clients_share_steps_and_the_queue_limit_holds(go_build, server):
  one = _load(go_build, server, 1, 8)
  many = _load(go_build, server, 16, 4)
  print(f'\n1 client: {one}\n16 clients: {many}')
  assert one['codes'] == {'200': 8} and many['codes'] == {'200': 64}
  assert many['completion_tokens'] == 64 * 32
  assert many['tokens_per_second'] > 3 * one['tokens_per_second']
  # 16 rows decode, 16 requests wait: the rest are refused with 429, nothing else.
  over = _load(go_build, server, 48, 2)
  print(f'48 clients: {over}')
  assert set(over['codes']) == {'200', '429'}, over


def _raw(server, data: bytes, read_until=b'\r\n\r\n') -> bytes:
  host, port = server.split(':')
  with socket.create_connection((host, int(port)), timeout=30) as s:
    s.sendall(data)
    got = b''
    while read_until not in got:
      part = s.recv(65536)
      if not part:
        break
      got += part
    return got


def _get(server, path) -> str:
  with urllib.request.urlopen(f'http://{server}{path}', timeout=30) as r:
    return r.read().decode()


def _post_raw(server, path, body: bytes, extra=b''):
  head = (f'POST {path} HTTP/1.1\r\nHost: {server}\r\nContent-Type: application/json\r\n'
          f'Content-Length: {len(body)}\r\nConnection: close\r\n').encode() + extra + b'\r\n'
  reply = _raw(server, head + body, read_until=b'}\n')
  status = int(reply.split(b' ', 2)[1])
  return status, json.loads(reply.split(b'\r\n\r\n', 1)[1].split(b'\n')[-2] or b'{}')


BAD = [
    ('/v1/completions', b'{"model": "tiny", "prompt": ', 400, None),
    ('/v1/completions', b'not json', 400, None),
    ('/v1/completions', b'{"model": "tiny", "prompt": "x", "max_tokens": "10"}', 400, 'max_tokens'),
    ('/v1/completions', b'{"model": "tiny", "prompt": ["x", 3]}', 400, 'prompt'),
    ('/v1/completions', b'{"model": "tiny", "prompt": "x", "temperature": "hot"}', 400,
     'temperature'),
    ('/v1/completions', b'{"model": "tiny", "prompt": "x", "max_tokens": -5}', 400, 'max_tokens'),
    ('/v1/completions', b'{"model": "tiny", "prompt": "x", "max_tokens": 1000000}', 400,
     'max_tokens'),
    ('/v1/completions', b'{"model": "tiny", "prompt": [5, 99999999]}', 400, 'prompt'),
    ('/v1/completions', b'{"model": "gpt-4", "prompt": "x"}', 404, 'model'),
    ('/v1/chat/completions', b'{"model": "tiny", "messages": []}', 400, 'messages'),
    ('/v1/chat/completions', b'{"model": "tiny", "messages": [{"role": "user"}]}', 400,
     'messages[0].content'),
    ('/v1/embeddings', b'{}', 404, None),
]


def test_bad_requests_get_json_errors_and_the_server_goes_on(client, server,
                                                             exported_tiny_run):
  run, _, _ = exported_tiny_run
  long_prompt = json.dumps(dict(model=NAME, prompt=list(range(5, 5 + run.model_cfg.max_len))))
  for path, body, code, param in BAD + [('/v1/completions', long_prompt.encode(), 400, 'prompt')]:
    status, reply = _post_raw(server, path, body)
    assert status == code, (path, body, reply)
    assert reply['error']['message'] and reply['error']['type'], reply
    assert reply['error']['param'] == param, (body, reply)
    assert client.completions.create(model=NAME, prompt='a', max_tokens=1).choices
  # The openai client raises its typed errors for them.
  with pytest.raises(openai.BadRequestError):
    client.completions.create(model=NAME, prompt='x', max_tokens=WIDTH + 1)
  with pytest.raises(openai.NotFoundError):
    client.chat.completions.create(model='gpt-4', messages=[{'role': 'user', 'content': 'x'}])
  # A 10 MB body: refused from its Content-Length, before it is read.
  head = (f'POST /v1/completions HTTP/1.1\r\nHost: {server}\r\nContent-Length: {10 * 2**20}\r\n'
          'Content-Type: application/json\r\n\r\n').encode()
  reply = _raw(server, head + b'{"model": "tiny", "prompt": "' + b'x' * 2**16, read_until=b'}\n')
  assert reply.startswith(b'HTTP/1.1 413'), reply[:200]
  assert b'"error"' in reply
  assert client.completions.create(model=NAME, prompt='a', max_tokens=1).choices


def test_a_client_that_hangs_up_mid_stream_frees_its_rows(client, server):
  body = json.dumps(dict(model=NAME, prompt='def main(', max_tokens=WIDTH, temperature=0,
                         stream=True, n=4)).encode()
  head = (f'POST /v1/completions HTTP/1.1\r\nHost: {server}\r\n'
          f'Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n').encode()
  first = _raw(server, head + body, read_until=b'data: ')  # Closed after the first chunk.
  assert b'200 OK' in first
  deadline = time.time() + 30
  while time.time() < deadline:
    health = json.loads(_get(server, '/health'))
    if health['active_rows'] == 0:
      break
    time.sleep(0.05)
  assert health['active_rows'] == 0, health
  assert client.completions.create(model=NAME, prompt='a', max_tokens=2).usage.completion_tokens


def test_metrics_count_requests_tokens_and_latency(client, server):
  client.completions.create(model=NAME, prompt='a', max_tokens=3, temperature=0)
  text = _get(server, '/metrics')
  assert re.search(r'llmjax_requests_total\{path="/v1/completions",code="200"\} \d+', text)
  assert re.search(r'llmjax_tokens_total\{kind="completion"\} \d+', text)
  assert 'llmjax_queue_depth 0' in text
  assert 'llmjax_request_duration_seconds_bucket{path="/v1/completions",le="+Inf"}' in text


def test_sigterm_finishes_the_stream_in_flight_and_exits_0(go_build, export_dir):
  proc, addr = _start(go_build, export_dir, '-warmup=false', '-api_key', 'k3y')
  try:
    c = openai.OpenAI(base_url=f'http://{addr}/v1', api_key='k3y', max_retries=0, timeout=120)
    with pytest.raises(openai.AuthenticationError):
      openai.OpenAI(base_url=f'http://{addr}/v1', api_key='wrong', max_retries=0).models.list()
    assert [m.id for m in c.models.list().data] == [NAME]
    stream = c.completions.create(model=NAME, prompt='def main(', max_tokens=WIDTH,
                                  temperature=0, stream=True)
    chunks = [next(stream)]
    proc.send_signal(signal.SIGTERM)
    chunks += list(stream)
    assert chunks[-1].choices[0].finish_reason == 'length'
    assert sum(len(ch.choices[0].text) for ch in chunks) > 0
  finally:
    code, err = _stop(proc)
  assert code == 0, err[-3000:]
  assert 'stopped' in err


def test_an_int8_export_serves_the_tokens_of_its_dequantised_weights(
    go_build, exported_tiny_run, tmp_path):
  # The server calls prefill and decode_step per token: the first fills the
  # export's float32 copies (--dequantize=once), later ones read them.
  import dataclasses  # pylint: disable=g-import-not-at-top
  from llm_jax.deploy import quantize, saved_model  # pylint: disable=g-import-not-at-top
  run, _, _ = exported_tiny_run
  out = str(tmp_path / 'int8')
  saved_model.export(run.workdir, out, quantize='int8', max_new_tokens=WIDTH,
                     batch_buckets=(1,), platforms=('cpu',), eval_batches=0,
                     log=lambda *_: None)
  specs, arrays, treedef = quantize.flatten_params(run.params, 'int8')
  deq = dataclasses.replace(run, params=quantize.unflatten_params(specs, arrays, treedef))
  prompts = ['def main(', 'import os\nclass Thing:', 'for i in range(']
  proc, addr = _start(go_build, out, '-max_batch', '4')
  try:
    c = openai.OpenAI(base_url=f'http://{addr}/v1', api_key='none', max_retries=0,
                      timeout=120)
    for _ in range(2):  # Filling, then filled.
      got = c.completions.create(model=NAME, prompt=prompts, max_tokens=12, temperature=0)
      ids = [run.tokenizer.encode(p) for p in prompts]
      want, counts = decode.generate_for_run(deq, ids, max_new_tokens=12, width=12)
      assert [ch.text for ch in got.choices] == [
          run.tokenizer.decode(w[:n].tolist()) for w, n in zip(want, counts)]
  finally:
    code, err = _stop(proc)
  assert code == 0, err[-3000:]
