"""utils/server.py and scripts/serve.py: request checks, every option reaching the server, then one live server
(continuous batching) driven by the official openai client, plain HTTP and headless Chromium. The engines themselves
are tested in test_serving.py."""

import concurrent.futures
import http.client
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import openai
import pytest
import torch

from helpers import randomize_
from model import ByteModel
from test_serving import CONTEXT, chat_ids, one_thread, random_model  # noqa: F401 (one_thread: a fixture)
from utils import inference
from utils import server as http_side
from utils.serving import Sampling, partial_stop_length

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))
import serve  # noqa: E402

API_KEY = "test-key"


def test_sampling_settings_and_limits_are_checked():
    with pytest.raises(http_side.RequestError, match="temperature"):
        http_side.checked_sampling(http_side.ChatRequest(messages=[], temperature=-0.1))
    with pytest.raises(http_side.RequestError, match="stop"):
        http_side.checked_sampling(http_side.ChatRequest(messages=[], stop=["a", ""]))
    with pytest.raises(http_side.RequestError, match="max_completion_tokens"):
        http_side.checked_sampling(http_side.ChatRequest(messages=[], max_tokens=5, max_completion_tokens=0))
    with pytest.raises(http_side.RequestError, match="top_k"):
        http_side.checked_sampling(http_side.ChatRequest(messages=[], top_k=-2))
    sampled, _, _ = http_side.checked_sampling(http_side.ChatRequest(messages=[], top_k=-1, top_p=0.5, seed=3))
    assert sampled == Sampling(do_sample=True, temperature=1.0, top_p=0.5, top_k=0, seed=3)
    sampling, stop, max_tokens = http_side.checked_sampling(
        http_side.ChatRequest(messages=[], temperature=0, top_p=0.5, stop="x", max_completion_tokens=7))
    assert sampling == Sampling(do_sample=False) and stop == ("x",) and max_tokens == 7
    assert http_side.token_limit(10, None, 64, "messages") == 54
    with pytest.raises(http_side.RequestError, match="context"):
        http_side.token_limit(64, None, 64, "messages")
    assert partial_stop_length("say hel", ("hello", "l")) == 3


def test_loads_a_lora_adapter_folder_on_its_base(tmp_path, tokenizer):
    from peft import LoraConfig, PeftModel, get_peft_model

    base_folder = tmp_path / "base"
    random_model(tokenizer).save_pretrained(base_folder)
    tokenizer.save_pretrained(base_folder)
    adapted = get_peft_model(ByteModel.from_pretrained(base_folder), LoraConfig(r=4, target_modules=["q_proj"]))
    randomize_(adapted.base_model.model.model.layers[0].self_attn.q_proj.lora_B)
    adapted.save_pretrained(tmp_path / "run" / "adapter")
    # The adapter folder alone: no tokenizer in it or around it, only its base model's.
    language_model, loaded_tokenizer = serve.load(str(tmp_path / "run" / "adapter"))
    reference = PeftModel.from_pretrained(ByteModel.from_pretrained(base_folder), tmp_path / "run" / "adapter")
    prompt = torch.tensor([chat_ids(tokenizer, "hi")])
    torch.testing.assert_close(language_model(prompt).logits, reference.eval()(prompt).logits)
    assert not torch.allclose(language_model(prompt).logits, random_model(tokenizer)(prompt).logits)
    assert loaded_tokenizer.chat_template == tokenizer.chat_template


def test_loads_checkpoints_with_their_runs_tokenizer(tmp_path, tokenizer):
    tokenizer.save_pretrained(tmp_path / "tokenizer")
    run_config = f"data:\n  tokenizer: {tmp_path / 'tokenizer'}\n"
    # A step folder holds the run's config; best/ has only the model, and the run folder the config.
    for checkpoint, config in (("step_5", "checkpoints/step_5/config.yaml"), ("best", "config.yaml")):
        folder = tmp_path / "run" / "checkpoints" / checkpoint
        random_model(tokenizer).save_pretrained(folder)
        (tmp_path / "run" / config).write_text(run_config)
        language_model, loaded_tokenizer = serve.load(str(folder))
        assert type(language_model) is ByteModel and loaded_tokenizer.chat_template == tokenizer.chat_template


def test_bad_command_line_exits_2(tmp_path, monkeypatch, capsys):
    busy = socket.create_server(("127.0.0.1", 0))
    try:
        for bad in (["--model", str(tmp_path / "missing"), "--port", "0"],
                    ["--model", str(tmp_path), "--port", "70000"],
                    ["--model", str(tmp_path), "--max-batch-size", "0"],
                    ["--model", str(tmp_path), "--port", str(busy.getsockname()[1])]):
            monkeypatch.setattr(sys, "argv", ["serve.py", *bad])
            with pytest.raises(SystemExit) as exit_info:
                serve.main()
            err = capsys.readouterr().err
            assert exit_info.value.code == 2 and err.startswith("error:") and err.count("\n") == 1, err
    finally:
        busy.close()


@pytest.fixture(scope="module")
def model_folders(tmp_path_factory, tokenizer) -> dict[str, Path]:
    """A tiny model folder, and another whose output layer is doubled."""
    root = tmp_path_factory.mktemp("serve-options")
    language_model = random_model(tokenizer)
    for name in ("model", "other"):
        language_model.save_pretrained(root / name)
        tokenizer.save_pretrained(root / name)
        with torch.no_grad():
            language_model.lm_head.weight.mul_(2.0)
    return {"model": root / "model", "other": root / "other"}


SERVING_ENGINE = serve.serving_engine


def served(monkeypatch, arguments: list[str]) -> dict:
    """serve.py's main with `arguments`, stopped where uvicorn would start serving: its listening address, engine and
    app, and the threads generation runs on."""
    from fastapi.testclient import TestClient

    seen = {}

    class Server:
        def __init__(self, config):
            seen["app"] = config.app

        def run(self, sockets):
            seen["address"] = sockets[0].getsockname()[:2]
            seen["threads"] = torch.get_num_threads()

    def engine_seen(*args, **kwargs):
        seen["engine"] = SERVING_ENGINE(*args, **kwargs)
        return seen["engine"]

    monkeypatch.setattr(serve.uvicorn, "Server", Server)
    monkeypatch.setattr(serve, "serving_engine", engine_seen)
    monkeypatch.setattr(sys, "argv", ["serve.py", *arguments])
    threads = torch.get_num_threads()
    try:
        serve.main()
    finally:
        torch.set_num_threads(threads)
    with TestClient(seen["app"]) as client:
        seen["model_ids"] = [model["id"] for model in client.get(
            "/v1/models", headers={"Authorization": "Bearer secret"}).json()["data"]]
        seen["unauthorised"] = client.get("/v1/models").status_code
    return seen


def output_layer(seen: dict) -> torch.Tensor:
    return seen["engine"].model.lm_head.weight


# An option -> its value, and what is true of the server started with it (and not of the one started without).
# "{other}" and "{port}" stand for the second model folder and a free port.
OPTIONS = {
    "--model": ("{other}", lambda seen, default: torch.equal(output_layer(seen), 2 * output_layer(default))),
    "--host": ("0.0.0.0", lambda seen, default: seen["address"][0] == "0.0.0.0"),
    "--port": ("{port}", lambda seen, default: seen["address"][1] != default["address"][1]),
    "--api-key": ("secret", lambda seen, default: seen["unauthorised"] == 401),
    "--model-name": ("tiny", lambda seen, default: seen["model_ids"] == ["tiny"]),
    "--max-batch-size": ("3", lambda seen, default: seen["engine"].max_batch_size == 3),
    "--batch-window-ms": ("250", lambda seen, default: seen["engine"].batch_window == 0.25),
    "--engine": ("continuous", lambda seen, default: seen["engine"].name == "continuous"),
    "--threads": ("2", lambda seen, default: seen["threads"] == 2),
    "--quantize": ("int8", lambda seen, default: getattr(seen["engine"].model.config, "quantization", None) == "int8"),
    "--attn-implementation": ("eager", lambda seen, default: seen["engine"].model.config._attn_implementation
                              == "eager"),
    "--precision": ("bf16", lambda seen, default: seen["engine"].model.dtype == torch.bfloat16),
}


@pytest.mark.parametrize("option", sorted(OPTIONS))
def test_each_option_reaches_the_server(option, model_folders, monkeypatch):
    value, holds = OPTIONS[option]
    monkeypatch.setattr(inference, "bf16_speedup", lambda *args: 1.0)  # the default, auto, picks fp32
    value = value.format(other=model_folders["other"], port=free_port())
    # The static engine (the --engine case overrides it): nothing else here needs the continuous one, which takes a
    # second to start and stop.
    base = ["--model", str(model_folders["model"]), "--port", "0", "--engine", "static"]
    default = served(monkeypatch, base)
    changed = served(monkeypatch, base + [option, value])
    assert holds(changed, default) and not holds(default, default)


# ----------------------------------------------------------------------------------------------------------------
# One live server for the rest of the module.

def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def get_json(url: str) -> dict:
    with urllib.request.urlopen(url, timeout=10) as response:
        return json.load(response)


def post(url: str, body: bytes | dict, key: str | None = API_KEY) -> tuple[int, dict]:
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    headers = {"Content-Type": "application/json", **({"Authorization": f"Bearer {key}"} if key else {})}
    try:
        with urllib.request.urlopen(urllib.request.Request(url, data, headers), timeout=60) as response:
            return response.status, json.load(response)
    except urllib.error.HTTPError as error:
        return error.code, json.load(error)


@pytest.fixture(scope="module")
def server(tmp_path_factory, tokenizer):
    folder = tmp_path_factory.mktemp("serve") / "model"
    random_model(tokenizer).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    port = free_port()
    process = subprocess.Popen([sys.executable, str(ROOT / "scripts" / "serve.py"), "--model", str(folder),
                                "--port", str(port), "--api-key", API_KEY, "--model-name", "tiny", "--threads", "1",
                                "--precision", "fp32"],
                               cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                               env={**os.environ, "PYTHONPATH": str(ROOT)})
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            assert process.poll() is None, process.stderr.read()
            try:
                get_json(f"{url}/health")
                break
            except OSError:
                assert time.monotonic() < deadline, "the server did not come up"
                time.sleep(0.2)
        yield url
    finally:
        process.terminate()
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
    # uvicorn shuts down gracefully, then re-raises the signal it caught.
    errors = process.stderr.read()
    assert process.returncode in (0, -signal.SIGTERM) and "Traceback" not in errors, errors


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"{server}/v1", api_key=API_KEY, max_retries=0, timeout=60)


def ask(client, content: str, **fields):
    return client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": content}],
                                          **{"temperature": 0, "max_tokens": 8, **fields})


@pytest.mark.slow
def test_openai_client_chat_streamed_and_not(client, tokenizer):
    assert [model.id for model in client.models.list()] == ["tiny"]
    answer = ask(client, "你好")
    choice = answer.choices[0]
    prompt = chat_ids(tokenizer, "你好")
    reference = random_model(tokenizer).generate(torch.tensor([prompt]), max_new_tokens=8, do_sample=False,
                                                 pad_token_id=tokenizer.pad_token_id)
    assert choice.message.content == tokenizer.decode(reference[0, len(prompt):], skip_special_tokens=True)
    assert choice.finish_reason == "length" and choice.message.role == "assistant"
    assert (answer.usage.prompt_tokens, answer.usage.completion_tokens) == (len(prompt), 8)
    assert answer.model == "tiny" and answer.id.startswith("chatcmpl-") and answer.object == "chat.completion"

    chunks = list(ask(client, "你好", stream=True, stream_options={"include_usage": True}))
    deltas = [chunk.choices[0].delta.content for chunk in chunks if chunk.choices and chunk.choices[0].delta.content]
    assert "".join(deltas) == choice.message.content and len(deltas) > 1
    assert [chunk.choices[0].finish_reason for chunk in chunks if chunk.choices][-1] == "length"
    assert chunks[-1].usage.completion_tokens == 8 and chunks[-1].usage.prompt_tokens == len(prompt)
    assert len({chunk.id for chunk in chunks}) == 1

    # A stop string taken from the middle of the greedy reply cuts it there.
    text = choice.message.content
    stop = text[len(text) // 2:len(text) // 2 + 2]
    stopped = ask(client, "你好", stop=[stop]).choices[0]
    assert stopped.message.content == text[:text.find(stop)] and stopped.finish_reason == "stop"
    # The same seed samples the same reply.
    sampled = [ask(client, "hello", temperature=1.0, seed=7, max_tokens=6).choices[0].message.content
               for _ in range(2)]
    assert sampled[0] == sampled[1]


@pytest.mark.slow
def test_openai_client_completions_streamed_and_not(client, tokenizer):
    completion = client.completions.create(model="tiny", prompt=["Once upon a time", "从前有座山"], max_tokens=5,
                                           temperature=0)
    assert [choice.index for choice in completion.choices] == [0, 1]
    assert all(choice.finish_reason == "length" and choice.text for choice in completion.choices)
    assert completion.usage.completion_tokens == 10
    assert completion.usage.prompt_tokens == sum(len(tokenizer.encode(text, add_special_tokens=False))
                                                 for text in ("Once upon a time", "从前有座山"))
    streamed = list(client.completions.create(model="tiny", prompt="从前有座山", max_tokens=5, temperature=0,
                                              stream=True))
    assert "".join(chunk.choices[0].text for chunk in streamed) == completion.choices[1].text
    assert streamed[-1].choices[0].finish_reason == "length"


@pytest.mark.slow
def test_bad_requests_get_openai_errors_and_the_server_keeps_serving(server, client):
    chat = f"{server}/v1/chat/completions"
    user = [{"role": "user", "content": "hi"}]
    cases = [
        (b'{"messages": [', 400, None),
        ({"messages": user, "temperature": "hot"}, 422, "temperature"),
        ({"messages": [{"role": "user", "content": 5}]}, 422, "messages[0].content"),
        ({"messages": user, "logit_bias": {"5": 1}}, 422, "logit_bias"),
        ({"messages": [{"role": "robot", "content": "hi"}]}, 400, "messages[0].role"),
        ({"messages": []}, 400, "messages"),
        ({"messages": user, "max_tokens": 0}, 400, "max_tokens"),
        ({"messages": user, "max_tokens": CONTEXT}, 400, "max_tokens"),
        ({"messages": [{"role": "user", "content": "hi " * CONTEXT}]}, 400, "messages"),
        ({"messages": user, "temperature": -0.5}, 400, "temperature"),
        ({"messages": user, "n": 2}, 400, "n"),
    ]
    for body, status, param in cases:
        code, reply = post(chat, body)
        assert code == status and set(reply["error"]) == {"message", "type", "param", "code"}, (body, reply)
        assert reply["error"]["param"] == param and reply["error"]["message"], (body, reply)
    code, reply = post(f"{server}/v1/completions", {"prompt": "word " * CONTEXT})
    assert code == 400 and reply["error"]["code"] == "context_length_exceeded"

    for key in (None, "wrong"):
        code, reply = post(chat, {"messages": user}, key=key)
        assert code == 401 and reply["error"]["type"] == "authentication_error"
    assert get_json(f"{server}/health")["api_key_required"] is True
    with urllib.request.urlopen(server, timeout=10) as page:
        assert page.status == 200 and "text/html" in page.headers["content-type"]

    with pytest.raises(openai.BadRequestError):
        ask(client, "hi", temperature=-1)
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model="tiny", messages=[])
    with pytest.raises(openai.UnprocessableEntityError):
        ask(client, "hi", max_tokens="many")
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=client.base_url, api_key="wrong", max_retries=0).models.list()
    assert ask(client, "hi").choices[0].finish_reason == "length"


@pytest.mark.slow
def test_staggered_clients_join_the_running_batch_and_answer_as_alone(server, client):
    questions = [f"question {index}: " + "why? " * (index % 5) for index in range(16)]
    alone = [ask(client, question, max_tokens=24).choices[0].message.content for question in questions[:4]]
    before = get_json(f"{server}/health")

    def staggered(index: int):
        time.sleep(0.02 * index)  # each arrives while the earlier ones are decoding
        return ask(client, questions[index], max_tokens=24)

    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        together = list(pool.map(staggered, range(16)))
    after = get_json(f"{server}/health")
    assert all(answer.choices[0].finish_reason == "length" for answer in together)
    assert [answer.choices[0].message.content for answer in together[:4]] == alone
    assert after["completed"] - before["completed"] == 16 and after["peak_running"] > 1
    assert after["engine"] == "continuous" and after["batches"] == before["batches"]


def test_a_model_continuous_batching_cannot_serve_is_served_statically(tokenizer, capsys):
    from helpers import tiny_config

    dynamic = ByteModel(tiny_config(vocab_size=len(tokenizer), rope_parameters={
        "rope_type": "dynamic", "factor": 2.0, "rope_theta": 10000.0})).eval()
    engine = serve.serving_engine("continuous", dynamic, tokenizer, 4, 0.01)
    assert engine.name == "static" and "dynamic NTK RoPE" in capsys.readouterr().err


@pytest.mark.slow
@pytest.mark.parametrize("stream", [True, False])
def test_a_client_that_disconnects_stops_its_generation(server, stream):
    before = get_json(f"{server}/health")
    connection = http.client.HTTPConnection("127.0.0.1", int(server.rsplit(":", 1)[1]), timeout=30)
    connection.request("POST", "/v1/chat/completions",
                       json.dumps({"messages": [{"role": "user", "content": "hi"}], "stream": stream,
                                   "temperature": 0}),
                       {"Content-Type": "application/json", "Authorization": f"Bearer {API_KEY}"})
    if stream:
        response = connection.getresponse()
        assert response.status == 200
        # The role chunk comes at once; the first text means generation is running.
        while not (line := response.readline()).startswith(b"data: {") \
                or not json.loads(line[6:])["choices"][0]["delta"].get("content"):
            pass
    else:
        deadline = time.monotonic() + 20
        while get_json(f"{server}/health")["running"] == 0:
            assert time.monotonic() < deadline, "generation did not start"
            time.sleep(0.05)
    connection.sock.shutdown(socket.SHUT_RDWR)
    connection.close()
    deadline = time.monotonic() + 20
    while (health := get_json(f"{server}/health"))["completed"] == before["completed"]:
        assert time.monotonic() < deadline, "the abandoned generation did not stop"
        time.sleep(0.1)
    # Without a stop it would have run to the context's end (about 4,000 tokens).
    assert health["generated_tokens"] - before["generated_tokens"] < CONTEXT // 4


def browser():
    """Headless Chromium through selenium, or None where neither Chromium nor its driver is installed."""
    binary = next(filter(None, map(shutil.which, ("chromium", "chromium-browser", "google-chrome"))), None)
    driver = shutil.which("chromedriver")
    if binary is None or driver is None:
        return None
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = binary
    for argument in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=900,700"):
        options.add_argument(argument)
    return webdriver.Chrome(service=Service(driver), options=options)


@pytest.mark.slow
def test_chat_page_in_a_real_browser_streams_a_reply(server, client):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    driver = browser()
    if driver is None:
        pytest.skip("no Chromium with chromedriver found (Debian: apt-get install chromium chromium-driver)")
    try:
        driver.get(server)
        wait = WebDriverWait(driver, 30)
        wait.until(lambda page: "tiny" in page.find_element(By.ID, "status").text)
        assert driver.find_element(By.ID, "key-panel").is_displayed()
        driver.find_element(By.ID, "api-key").send_keys(API_KEY)
        for field, value in (("temperature", "0"), ("max-tokens", "8")):
            element = driver.find_element(By.ID, field)
            element.clear()
            element.send_keys(value)
        driver.find_element(By.ID, "prompt").send_keys("你好")
        driver.find_element(By.ID, "send").click()
        reply = wait.until(lambda page: page.find_element(By.CSS_SELECTOR, ".message.assistant[data-done]"))
        assert reply.get_attribute("data-finish-reason") == "length"
        assert int(reply.get_attribute("data-chunks")) > 1
        assert reply.text == ask(client, "你好").choices[0].message.content.strip()
        assert not driver.find_elements(By.CSS_SELECTOR, ".message.error")
    finally:
        driver.quit()
