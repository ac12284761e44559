"""scripts/generate_descriptions.py against a fake OpenAI-compatible server on 127.0.0.1."""
import importlib.util
import json
import os
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "scripts", "generate_descriptions.py")

_spec = importlib.util.spec_from_file_location("generate_descriptions", SCRIPT)
gd = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(gd)

from datasets.catalog import CATALOG, MODALITY_NAMES  # noqa: E402  (the script put ROOT on sys.path)

KEY = "sk-test-Zq8vK3-do-not-leak-71fe"
DATASET = "Head_CT"  # two classes: the smallest catalog dataset
N_QUESTIONS = len(json.load(open(os.path.join(ROOT, "llm_descriptions", "questions.json")))["questions"])


def plain_answer(question, count):
    return f"Answer number {count} shows a well defined hyperdense region in the brain."


class FakeServer:
    """POST /v1/chat/completions in the OpenAI response shape.

    ``failures`` lists what the first requests get instead of an answer: an
    HTTP status code, "drop" to close the connection without a response, or
    "html"/"badjson" for a 200 reply whose body is not JSON (declared as HTML/JSON).
    ``fail_from`` answers every request from that number on with status 400.
    """

    def __init__(self, answer=plain_answer, failures=(), fail_from=None, retry_after=None):
        self.answer = answer
        self.failures = list(failures)
        self.fail_from = fail_from
        self.retry_after = retry_after
        self.requests = []
        self.lock = threading.Lock()
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"
            # Headers and body go out as separate writes; without this each
            # request would wait on a delayed ACK.
            disable_nagle_algorithm = True

            def log_message(self, *args):
                pass

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))))
                with server.lock:
                    count = len(server.requests)
                    server.requests.append({"path": self.path, "auth": self.headers.get("Authorization"), "body": body})
                    failure = server.failures[count] if count < len(server.failures) else None
                if self.path != "/v1/chat/completions":
                    return self._send(404, {"error": {"message": f"no route {self.path}"}})
                auth = self.headers.get("Authorization", "")
                if auth != f"Bearer {KEY}":
                    # Real servers echo part of a wrong key; this one echoes all of it.
                    wrong = auth.removeprefix("Bearer ")
                    return self._send(401, {"error": {"message": f"Incorrect API key provided: {wrong}",
                                                      "type": "invalid_request_error"}})
                if failure == "drop":
                    self.close_connection = True
                    return
                if failure in ("html", "badjson"):
                    data = b"<html><body>502 Bad Gateway</body></html>"
                    self.send_response(200)
                    self.send_header("Content-Type", "text/html" if failure == "html" else "application/json")
                    self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    self.wfile.write(data)
                    return
                if failure is not None:
                    return self._send(failure, {"error": {"message": f"simulated {failure}"}})
                if server.fail_from is not None and count >= server.fail_from:
                    return self._send(400, {"error": {"message": "simulated bad request"}})
                question = body["messages"][-1]["content"]
                self._send(200, {
                    "id": f"chatcmpl-{count}", "object": "chat.completion", "created": 0, "model": body["model"],
                    "choices": [{"index": 0, "finish_reason": "stop",
                                 "message": {"role": "assistant", "content": server.answer(question, count)}}],
                    "usage": {"prompt_tokens": 10, "completion_tokens": 20, "total_tokens": 30},
                })

            def _send(self, status, payload):
                data = json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                if status == 429 and server.retry_after is not None:
                    self.send_header("Retry-After", str(server.retry_after))
                self.end_headers()
                self.wfile.write(data)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.base_url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture(autouse=True)
def _env(monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", KEY)
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    for name in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy", "https_proxy", "all_proxy",
                 "OPENAI_BASE_URL", "MEDPROMPT_LLM_MODEL"):
        monkeypatch.delenv(name, raising=False)


def run(server, out_dir, *extra, target=DATASET):
    return gd.main([target, "--base-url", server.base_url, "--out-dir", str(out_dir), "--model", "test-model",
                    "--retry-delay", "0.01", "--timeout", "10", *extra])


def all_files_text(folder):
    texts = []
    for dirpath, _, files in os.walk(folder):
        for name in files:
            with open(os.path.join(dirpath, name), encoding="utf-8") as f:
                texts.append(f.read())
    return "\n".join(texts)


def test_writes_every_class_in_catalog_order(tmp_path, capsys):
    with FakeServer() as server:
        assert run(server, tmp_path, "--answers-per-question", "2") == 0
    classnames = list(CATALOG[DATASET].classnames)
    assert len(server.requests) == len(classnames) * N_QUESTIONS * 2

    out = tmp_path / f"{DATASET}.json"
    text = out.read_text(encoding="utf-8")
    data = json.loads(text)
    assert list(data) == classnames
    assert text == json.dumps(data, indent=1, ensure_ascii=False) + "\n"
    for classname, descriptions in data.items():
        assert len(descriptions) == N_QUESTIONS * 2  # every answer distinct, one sentence each
        assert all(isinstance(d, str) and gd.clip_token_count(d) <= 75 for d in descriptions)
    assert "wrote" in capsys.readouterr().out

    first = server.requests[0]
    assert first["path"] == "/v1/chat/completions"
    assert first["body"]["model"] == "test-model"
    assert first["body"]["temperature"] == 0.8
    system, user = first["body"]["messages"]
    assert system["role"] == "system" and "medical imaging expert" in system["content"]
    assert "Normal brain" in user["content"] and MODALITY_NAMES["ct"] in user["content"]
    assert any("attenuation, density" in r["body"]["messages"][-1]["content"] for r in server.requests)
    # Nothing touches the repository's own descriptions.
    assert not (tmp_path / "questions.json").exists()


def test_retries_rate_limits_server_errors_and_dropped_connections(tmp_path, capsys):
    failures = [429, 500, 503, "drop"]
    with FakeServer(failures=failures, retry_after=0) as server:
        assert run(server, tmp_path, "--answers-per-question", "1") == 0
    assert len(server.requests) == len(failures) + 2 * N_QUESTIONS
    err = capsys.readouterr().err
    assert "HTTP 429" in err and "HTTP 500" in err and "connection error" in err
    assert json.loads((tmp_path / f"{DATASET}.json").read_text())


def test_gives_up_after_retries(tmp_path, capsys):
    with FakeServer(failures=[500] * 10) as server:
        assert run(server, tmp_path, "--retries", "2") == 2
    assert len(server.requests) == 3
    err = capsys.readouterr().err.strip()
    assert err.splitlines()[-1].startswith("error: ") and "after 2 retries" in err and "500" in err
    assert not (tmp_path / f"{DATASET}.json").exists()


def test_unauthorized_is_one_line_error(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", "sk-wrong-key")
    with FakeServer() as server:
        assert run(server, tmp_path) == 2
    assert len(server.requests) == 1  # a 401 is not retried
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and err.strip().splitlines()[-1] == errors[0]
    assert "401" in errors[0] and "OPENAI_API_KEY" in errors[0] and "Traceback" not in err
    assert not (tmp_path / f"{DATASET}.json").exists()


def test_missing_key_names_the_variable(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("OPENAI_API_KEY")
    monkeypatch.setenv("MY_LLM_KEY", "")
    with FakeServer() as server:
        assert run(server, tmp_path, "--api-key-env", "MY_LLM_KEY") == 2
    assert not server.requests
    assert "MY_LLM_KEY" in capsys.readouterr().err


def test_unknown_target_is_user_error(tmp_path, capsys):
    with FakeServer() as server:
        assert run(server, tmp_path, target="NoSuchDataset") == 2
    assert "unknown dataset or group 'NoSuchDataset'" in capsys.readouterr().err


def test_resumes_from_cache(tmp_path, capsys):
    total = 2 * N_QUESTIONS * 3
    with FakeServer(fail_from=5) as server:
        assert run(server, tmp_path) == 2
    assert len(server.requests) == 6  # five answers cached, the sixth refused
    assert not (tmp_path / f"{DATASET}.json").exists()

    with FakeServer() as server:
        assert run(server, tmp_path) == 0
    assert len(server.requests) == total - 5
    first = (tmp_path / f"{DATASET}.json").read_text()

    # A complete cache answers everything: no request, the same file.
    with FakeServer() as server:
        assert run(server, tmp_path, "--overwrite") == 0
        assert run(server, tmp_path) == 0  # existing output is skipped
    assert server.requests == []
    assert (tmp_path / f"{DATASET}.json").read_text() == first
    assert "skip Head_CT" in capsys.readouterr().out

    # The cache is keyed by model: another model asks again.
    with FakeServer() as server:
        assert gd.main([DATASET, "--base-url", server.base_url, "--out-dir", str(tmp_path), "--model", "other",
                        "--overwrite", "--answers-per-question", "1"]) == 0
    assert len(server.requests) == 2 * N_QUESTIONS


def markdown_answer(question, count):
    return (
        "Sure! Here are the key features:\n\n"
        "### Visual features\n"
        f"- **Hyperdense** crescent along the skull in case {count}.\n"
        "* A *bright* region with mass effect\n"
        "1. Midline shift toward the opposite side. Effacement of the sulci is common.\n"
        "2) Blood in the ventricles\n"
        "---\n"
        "The finding is seen as a bright area on CT. " + "It is very long " + "and bright " * 60 + "indeed."
    )


def test_cleans_markdown_lists_and_long_answers(tmp_path):
    with FakeServer(answer=markdown_answer) as server:
        assert run(server, tmp_path, "--answers-per-question", "1") == 0
    data = json.loads((tmp_path / f"{DATASET}.json").read_text())
    for descriptions in data.values():
        # The count varies per answer; the shared sentences appear once per class.
        assert descriptions[1:6] == [
            "A bright region with mass effect.",
            "Midline shift toward the opposite side.",
            "Effacement of the sulci is common.",
            "Blood in the ventricles.",
            "The finding is seen as a bright area on CT.",
        ]
        assert descriptions[0].startswith("Hyperdense crescent along the skull in case")
        assert len(descriptions) == 5 + N_QUESTIONS
        for d in descriptions:
            assert not any(mark in d for mark in ("*", "#", "Sure", "very long", "\n"))


def test_clean_answer_units():
    assert gd.clean_answer("**Bold** text with `code` and [a link](http://x).") == ["Bold text with code and a link."]
    assert gd.clean_answer("1. First item here\n2. second item here") == ["First item here.", "Second item here."]
    assert gd.clean_answer("A lesion near the disc, e.g. the macula. Another sentence follows.") == [
        "A lesion near the disc, e.g. the macula.", "Another sentence follows."]
    assert gd.clean_answer("One line\nthat wraps here.") == ["One line that wraps here."]
    assert gd.clean_answer("Ok.\n\nYes\n- \n") == []
    long_sentence = "Bright " * 80 + "lesion."
    assert gd.clean_answer(long_sentence) == []
    assert gd.clean_answer("Short finding is here.", max_tokens=3) == []
    assert gd.clean_class(["Same thing seen here.", "same  thing seen here", "Other thing seen here."]) == [
        "Same thing seen here.", "Other thing seen here."]


def test_class_without_usable_description_is_an_error(tmp_path, capsys):
    with FakeServer(answer=lambda q, c: "Sure!\n## Features:\n- Yes") as server:
        assert run(server, tmp_path, "--answers-per-question", "1") == 2
    err = capsys.readouterr().err
    assert "class 'Normal_brain' of Head_CT has no usable description" in err
    assert not (tmp_path / f"{DATASET}.json").exists()


def test_api_key_never_appears(tmp_path, capsys, monkeypatch):
    with FakeServer(failures=[429, "drop"]) as server:
        assert run(server, tmp_path, "--answers-per-question", "1") == 0
    assert server.requests[0]["auth"] == f"Bearer {KEY}"  # the key was really in use
    monkeypatch.setenv("OPENAI_API_KEY", KEY + "-revoked")
    with FakeServer() as server:  # the server echoes the whole wrong key in its 401
        assert run(server, tmp_path / "second") == 2
    captured = capsys.readouterr()
    assert "Incorrect API key provided: ***" in captured.err
    for text in (captured.out, captured.err, all_files_text(tmp_path)):
        assert KEY not in text


def test_api_key_echoed_in_answers_is_scrubbed_from_everything_written(tmp_path, capsys):
    echo = lambda question, count: f"The key {KEY} shows a well defined hyperdense region in the brain."
    with FakeServer(answer=echo) as server:
        assert run(server, tmp_path, "--answers-per-question", "1") == 0
    captured = capsys.readouterr()
    written = all_files_text(tmp_path)
    assert "hyperdense region" in written and "***" in written
    for text in (captured.out, captured.err, written):
        assert KEY not in text


def test_non_json_reply_is_retried_then_one_line(tmp_path, capsys):
    with FakeServer(failures=["html", "badjson"]) as server:  # a proxy's error page, then a good answer
        assert run(server, tmp_path, "--answers-per-question", "1") == 0
    assert len(server.requests) == 2 + 2 * N_QUESTIONS
    assert "not JSON" in capsys.readouterr().err
    with FakeServer(failures=["html"] * 5) as server:
        assert run(server, tmp_path / "second", "--retries", "2") == 2
    assert len(server.requests) == 3
    err = capsys.readouterr().err.strip()
    assert err.splitlines()[-1].startswith("error: ") and "not" in err.splitlines()[-1] and "Traceback" not in err
    assert "--base-url" in err.splitlines()[-1]


def test_cli_end_to_end(tmp_path):
    env = {k: v for k, v in os.environ.items() if "proxy" not in k.lower()}
    env.update(OPENAI_API_KEY=KEY, HF_HUB_OFFLINE="1", NO_PROXY="127.0.0.1,localhost")
    with FakeServer() as server:
        result = subprocess.run(
            [sys.executable, SCRIPT, DATASET, "--base-url", server.base_url, "--out-dir", str(tmp_path),
             "--answers-per-question", "1", "--retry-delay", "0.01"],
            cwd=str(tmp_path), env=env, capture_output=True, text=True, timeout=120,
        )
    assert result.returncode == 0, result.stderr
    assert server.requests[0]["body"]["model"] == gd.DEFAULT_MODEL
    assert list(json.loads((tmp_path / f"{DATASET}.json").read_text())) == list(CATALOG[DATASET].classnames)
    assert (tmp_path / ".cache").is_dir()
    assert KEY not in result.stdout + result.stderr


def test_declared_dataset_gets_its_declared_descriptions_file(tmp_path):
    folder = tmp_path / "data" / "Moles"
    folder.mkdir(parents=True)
    (folder / "dataset.yaml").write_text(
        "name: Moles\nmodality: thermography\nclassnames: [benign_nevus, melanoma]\n"
        "template: 'a thermography image of {}.'\ndescriptions: moles_descriptions.json\n"
    )
    with FakeServer() as server:
        assert run(server, tmp_path / "out", "--answers-per-question", "1", "--root", str(tmp_path / "data"),
                   target="Moles") == 0
    data = json.loads((folder / "moles_descriptions.json").read_text())
    assert list(data) == ["benign_nevus", "melanoma"]
    assert not (tmp_path / "out" / "Moles.json").exists()
    questions = [r["body"]["messages"][-1]["content"] for r in server.requests]
    assert len(questions) == 2 * N_QUESTIONS
    assert all("thermography images" in q for q in questions) and any(gd.GENERIC_FOCUS in q for q in questions)


@pytest.mark.parametrize("ending", ["\n", "\r\n", "\r"])
def test_key_with_a_line_ending_is_used_stripped(ending, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", KEY + ending)
    with FakeServer() as server:
        assert run(server, tmp_path, "--answers-per-question", "1") == 0, capsys.readouterr().err
    assert server.requests[0]["auth"] == f"Bearer {KEY}"


@pytest.mark.parametrize("ending", ["\n", "\r\n", "\r"])
def test_wrong_key_with_a_line_ending_is_redacted(ending, tmp_path, capsys, monkeypatch):
    wrong = KEY + "-revoked"
    monkeypatch.setenv("OPENAI_API_KEY", wrong + ending)
    with FakeServer() as server:  # the server echoes the whole wrong key in its 401
        assert run(server, tmp_path) == 2
    captured = capsys.readouterr()
    assert "Incorrect API key provided: ***" in captured.err and "Traceback" not in captured.err
    for text in (captured.out, captured.err, all_files_text(tmp_path)):
        assert KEY not in text


@pytest.mark.parametrize("place", ["userinfo", "user", "query"])
def test_key_inside_the_base_url_is_redacted(place, tmp_path, capsys):
    with FakeServer(fail_from=0) as server:  # every request refused: the message names the server
        scheme, rest = server.base_url.split("://")
        base_url = {"userinfo": f"{scheme}://me:{KEY}@{rest}", "user": f"{scheme}://{KEY}@{rest}",
                    "query": f"{server.base_url}?api-key={KEY}&api-version=1"}[place]
        code = gd.main([DATASET, "--base-url", base_url, "--out-dir", str(tmp_path), "--model", "test-model",
                        "--retry-delay", "0.01", "--timeout", "10", "--retries", "1"])
    captured = capsys.readouterr()
    assert code == 2 and "Traceback" not in captured.err
    errors = [line for line in captured.err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "127.0.0.1" in errors[0] and "***" in errors[0], captured.err
    for text in (captured.out, captured.err, all_files_text(tmp_path)):
        assert KEY not in text


@pytest.mark.parametrize("key", ["sk-tëst-key-123", "sk-test\u2011key-123", "“sk-test-key-123”"])
def test_non_ascii_key_is_one_line(key, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", key)
    with FakeServer() as server:
        assert run(server, tmp_path) == 2
    assert not server.requests
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: the API key in $OPENAI_API_KEY holds non-ASCII"), err
    assert key not in err and "Traceback" not in err
