#!/usr/bin/env python
"""Write ``llm_descriptions/<dataset>.json`` by asking a large language model.

For every class of every dataset in TARGET (a dataset name or a modality group,
see ``datasets/catalog.py``, or a dataset declared in data under ``--root``) each question of ``llm_descriptions/questions.json``
is asked ``--answers-per-question`` times of an OpenAI-compatible
chat-completions endpoint. The answers are split into single sentences, cleaned
of markdown, limited to ``--max-tokens-per-description`` CLIP tokens and
de-duplicated, and written as ``{classname: [descriptions]}``.

Every raw answer is cached under ``--cache-dir`` as soon as it arrives, so an
interrupted run resumes without asking again, and changing the cleaning options
never costs a request. A dataset whose output file already exists is skipped
unless ``--overwrite`` is given.

    export OPENAI_API_KEY=...
    python scripts/generate_descriptions.py Head_CT
    python scripts/generate_descriptions.py ct --model gpt-4o --overwrite
    python scripts/generate_descriptions.py MyData --root DATA

A declared dataset's descriptions go to the file its declaration names
(``descriptions:`` in ``DATA/MyData/dataset.yaml``), else ``<out-dir>/MyData.json``.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import re
import sys
import time
from urllib.parse import parse_qsl, quote, quote_plus, urlencode, urlsplit, urlunsplit

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import openai  # noqa: E402
from tqdm import tqdm  # noqa: E402

from core.errors import UserError  # noqa: E402
from core.utils import read_json, remove_stale_temp_files, write_json_atomic  # noqa: E402
from datasets.catalog import MODALITY_NAMES, get_entry, readable_classname, resolve_target  # noqa: E402
from datasets.declared import lookup  # noqa: E402

DEFAULT_BASE_URL = "https://api.openai.com/v1"
# A small, inexpensive model is plenty for one-sentence visual descriptions.
DEFAULT_MODEL = "gpt-4o-mini"
DEFAULT_OUT_DIR = os.path.join(ROOT, "llm_descriptions")
DEFAULT_QUESTIONS = os.path.join(ROOT, "llm_descriptions", "questions.json")
# CLIP's context is 77 tokens, two of which are the start and end markers.
CLIP_TOKEN_LIMIT = 75
MAX_BACKOFF_S = 60.0
# Besides 429 and 5xx, the status codes OpenAI's own client treats as transient.
RETRYABLE_STATUS = {408, 409, 429}
MIN_WORDS = 3
# Visual vocabulary for a declared dataset whose modality has no 'focus' in questions.json.
GENERIC_FOCUS = "shape, size, location, colour, brightness and texture of the findings"

SYSTEM_PROMPT = (
    "You are a medical imaging expert. You write short visual descriptions of how a finding or class "
    "looks in medical images, to be read by an image-text model. Answer in one or two plain sentences "
    "that describe only what is visible in the image. No lists, no headings, no markdown, no preamble."
)


def parse_args(argv):
    parser = argparse.ArgumentParser(
        prog="generate_descriptions.py",
        description="Write llm_descriptions/<dataset>.json by asking an OpenAI-compatible chat model "
        "the structured knowledge questions of questions.json for every class.",
    )
    parser.add_argument("target", help="a dataset name or a modality group (e.g. Head_CT, ct, eye, all)")
    parser.add_argument("--base-url", default=os.environ.get("OPENAI_BASE_URL") or DEFAULT_BASE_URL,
                        help=f"chat-completions endpoint (default: $OPENAI_BASE_URL, else {DEFAULT_BASE_URL})")
    parser.add_argument("--model", default=os.environ.get("MEDPROMPT_LLM_MODEL") or DEFAULT_MODEL,
                        help=f"model name (default: $MEDPROMPT_LLM_MODEL, else {DEFAULT_MODEL})")
    parser.add_argument("--api-key-env", default="OPENAI_API_KEY", metavar="NAME",
                        help="environment variable holding the API key (default: %(default)s)")
    parser.add_argument("--root", default="",
                        help="data root holding datasets declared in data (DATA/<name>/dataset.yaml)")
    parser.add_argument("--out-dir", default=DEFAULT_OUT_DIR,
                        help="folder for <dataset>.json (default: the project's llm_descriptions)")
    parser.add_argument("--cache-dir", default=None,
                        help="folder for the raw answers (default: <out-dir>/.cache)")
    parser.add_argument("--questions", default=DEFAULT_QUESTIONS,
                        help="questions file (default: llm_descriptions/questions.json)")
    parser.add_argument("--answers-per-question", type=int, default=3, metavar="N",
                        help="answers asked per question and class, one request each (default: %(default)s)")
    parser.add_argument("--temperature", type=float, default=0.8,
                        help="sampling temperature; above 0 so repeated answers differ (default: %(default)s)")
    parser.add_argument("--max-tokens-per-description", type=int, default=CLIP_TOKEN_LIMIT, metavar="T",
                        help="drop sentences longer than T CLIP tokens, at most 75 (default: %(default)s)")
    parser.add_argument("--overwrite", action="store_true",
                        help="regenerate datasets whose output file exists (default: skip them)")
    parser.add_argument("--retries", type=int, default=5,
                        help="retries per request on rate limits, server and connection errors (default: %(default)s)")
    parser.add_argument("--retry-delay", type=float, default=1.0, metavar="SECONDS",
                        help="first backoff delay, doubled on each retry, with jitter (default: %(default)s)")
    parser.add_argument("--timeout", type=float, default=60.0, metavar="SECONDS",
                        help="timeout of one request (default: %(default)s)")
    args = parser.parse_args(argv)

    if args.answers_per_question < 1:
        raise UserError("--answers-per-question must be at least 1")
    if not 1 <= args.max_tokens_per_description <= CLIP_TOKEN_LIMIT:
        raise UserError(f"--max-tokens-per-description must be between 1 and {CLIP_TOKEN_LIMIT} (CLIP's context)")
    if args.retries < 0:
        raise UserError("--retries must be 0 or more")
    if args.retry_delay < 0:
        raise UserError("--retry-delay must be 0 or more")
    if args.timeout <= 0:
        raise UserError("--timeout must be positive")
    if not 0 <= args.temperature <= 2:
        raise UserError("--temperature must be between 0 and 2")
    if not args.api_key_env:
        raise UserError("--api-key-env must name an environment variable")
    if args.cache_dir is None:
        args.cache_dir = os.path.join(args.out_dir, ".cache")
    return args


def load_questions(path):
    """The question templates and the per-modality focus phrases of ``questions.json``."""
    data = read_json(path, "questions file")
    questions = data.get("questions") if isinstance(data, dict) else None
    focus = data.get("focus") if isinstance(data, dict) else None
    if not questions or not all(isinstance(q, str) and q.strip() for q in questions):
        raise UserError(f"questions file {path} needs a non-empty list of strings under 'questions'")
    if not isinstance(focus, dict):
        raise UserError(f"questions file {path} needs a 'focus' object keyed by modality")
    for question in questions:
        try:
            question.format(classname="", modality="", focus="")
        except (KeyError, IndexError, ValueError):
            raise UserError(
                f"question '{question}' in {path} may only use the placeholders {{classname}}, {{modality}} and {{focus}}"
            ) from None
    return questions, focus


def questions_for(entry, classname, questions, focus, path):
    if entry.modality not in focus and not entry.declared_in:
        raise UserError(f"questions file {path} has no 'focus' for modality '{entry.modality}' (dataset {entry.name})")
    return [
        q.format(classname=readable_classname(classname),
                 modality=MODALITY_NAMES.get(entry.modality, f"{entry.modality} images"),
                 focus=focus.get(entry.modality, GENERIC_FOCUS))
        for q in questions
    ]


def _slug(text):
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("._") or "x"


class ClassCache:
    """The raw answers for one (model, dataset, class): ``{question: [answer 0, answer 1, ...]}``.

    The file is rewritten atomically after every answer, so a run stopped at
    any moment loses at most the request in flight.
    """

    def __init__(self, cache_dir, model, dataset, classname):
        # The hash keeps class names that slug alike (case, spaces) in separate files.
        digest = hashlib.sha1(f"{model}\n{dataset}\n{classname}".encode("utf-8")).hexdigest()[:10]
        self.path = os.path.join(cache_dir, _slug(model), _slug(dataset), f"{_slug(classname)}-{digest}.json")
        self.header = {"model": model, "dataset": dataset, "classname": classname}
        self.answers = {}
        if os.path.exists(self.path):
            data = read_json(self.path, "cache file")
            if not isinstance(data, dict) or any(data.get(k) != v for k, v in self.header.items()) \
                    or not isinstance(data.get("answers"), dict):
                raise UserError(f"cache file {self.path} does not belong to {model}/{dataset}/{classname}; delete it")
            self.answers = data["answers"]

    def scrub(self, secrets):
        """Remove the API key (and other secrets) from answers cached before they were scrubbed on arrival;
        rewrite the file if needed."""
        if any(scrub(a, secrets) != a for answers in self.answers.values() for a in answers):
            self.answers = {q: [scrub(a, secrets) for a in answers] for q, answers in self.answers.items()}
            write_json_atomic(self.path, {**self.header, "answers": self.answers}, indent=1)

    def get(self, question, index):
        answers = self.answers.get(question, [])
        return answers[index] if index < len(answers) else None

    def put(self, question, index, text):
        answers = self.answers.setdefault(question, [])
        # Answers are asked in index order, so the list never has a gap.
        assert index == len(answers), (index, len(answers))
        answers.append(text)
        write_json_atomic(self.path, {**self.header, "answers": self.answers}, indent=1)


def _one_line(text, limit=300):
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _server_message(exc):
    body = getattr(exc, "body", None)
    if isinstance(body, dict):
        error = body.get("error", body)
        if isinstance(error, dict) and error.get("message"):
            return str(error["message"])
        if isinstance(error, str):
            return error
    return getattr(exc, "message", None) or str(exc)


def _retry_after(exc):
    response = getattr(exc, "response", None)
    try:
        return float(response.headers.get("retry-after"))
    except (AttributeError, TypeError, ValueError):
        return None


class BadReply(Exception):
    """A reply that is not a chat completion (e.g. an HTML error page from a proxy)."""


def scrub(text, secrets):
    """``text`` without the API key (or any of a list of secrets), also URL-encoded: servers and error
    messages may echo them, and nothing printed or written may hold them."""
    if not isinstance(text, str):
        return text
    forms = {form for secret in ([secrets] if isinstance(secrets, str) else secrets) if secret
             for form in (secret, quote(secret, safe=""), quote_plus(secret, safe=""))}
    for form in sorted(forms, key=len, reverse=True):
        text = text.replace(form, "***")
    return text


def read_api_key(env_name):
    """The API key in ``$env_name`` without surrounding whitespace (a pasted key often ends in a newline)."""
    key = os.environ.get(env_name, "").strip()
    if not key.isascii():
        raise UserError(f"the API key in ${env_name} holds non-ASCII characters, which HTTP headers cannot carry; "
                        f"copy the key again (a pasted key may hold curly quotes or look-alike letters)")
    if any(c.isspace() or ord(c) < 32 or ord(c) == 127 for c in key):
        raise UserError(f"the API key in ${env_name} holds spaces or control characters; copy the key again")
    return key


def url_secrets(url):
    """User name, password and query values written into a URL (``https://user:key@host/v1?api-key=...``)."""
    try:
        parts = urlsplit(url)
        found = [parts.username, parts.password] + [v for _, v in parse_qsl(parts.query, keep_blank_values=True)]
    except ValueError:
        return []
    # Short values (api-version=1) are no secrets, and masking them would garble every message.
    return [v for v in found if v and len(v) >= 6]


def shown_url(url):
    """``url`` as messages show it: user information and query values masked."""
    try:
        parts = urlsplit(url)
        query = parse_qsl(parts.query, keep_blank_values=True)
    except ValueError:
        return "--base-url"
    netloc = parts.netloc.rpartition("@")[2]
    if "@" in parts.netloc:
        netloc = "***@" + netloc
    masked = urlencode([(k, "***") for k, _ in query], safe="*")
    return urlunsplit((parts.scheme, netloc, parts.path, masked, parts.fragment))


def _is_retryable(exc):
    if isinstance(exc, BadReply):
        return True
    if isinstance(exc, openai.APIConnectionError):
        return True
    if isinstance(exc, openai.APIStatusError):
        return exc.status_code in RETRYABLE_STATUS or exc.status_code >= 500
    return False


def _describe_error(exc):
    if isinstance(exc, openai.APITimeoutError):
        return "request timed out"
    if isinstance(exc, openai.APIConnectionError):
        cause = exc.__cause__ or exc
        return f"connection error ({type(cause).__name__}: {cause})"
    if isinstance(exc, openai.APIStatusError):
        return f"HTTP {exc.status_code}: {_server_message(exc)}"
    if isinstance(exc, BadReply):
        return str(exc)
    return f"{type(exc).__name__}: {exc}"


class Asker:
    """One chat-completions request per answer, retried with exponential backoff on transient errors."""

    def __init__(self, args, api_key):
        self.args = args
        self.api_key = api_key
        self.secrets = [api_key, *url_secrets(args.base_url)]
        self.shown_url = shown_url(args.base_url)
        # The client's own retries are off so that every retry goes through one
        # policy here, with the delays the user set.
        self.client = openai.OpenAI(base_url=args.base_url, api_key=api_key, max_retries=0, timeout=args.timeout)
        self.requests = 0

    def redact(self, text):
        """Servers may echo the key (in errors or answers); nothing printed, raised or written may contain it."""
        return scrub(text, self.secrets)

    def _request(self, question):
        self.requests += 1
        try:
            response = self.client.chat.completions.create(
                model=self.args.model,
                messages=[{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": question}],
                temperature=self.args.temperature,
            )
        except json.JSONDecodeError as e:
            raise BadReply(f"the reply is not JSON ({e.msg})") from None
        # The client hands back the raw text when the reply is not declared as JSON.
        if not hasattr(response, "choices"):
            raise BadReply(f"the reply is not a chat completion in JSON: {_one_line(response, 80)!r}")
        if not response.choices:
            return ""
        return response.choices[0].message.content or ""

    def ask(self, question, log=print):
        """The answer's text, without the API key; ``log`` reports each retry."""
        attempts = self.args.retries + 1
        for attempt in range(attempts):
            try:
                return self.redact(self._request(question))
            except (openai.OpenAIError, BadReply) as exc:
                what = self.redact(_one_line(_describe_error(exc)))
                if not _is_retryable(exc):
                    raise UserError(self._fatal_message(exc, what)) from None
                if attempt + 1 == attempts:
                    hint = ("check that --base-url is an OpenAI-compatible endpoint (it usually ends in /v1)"
                            if isinstance(exc, BadReply) else "try again later or raise --retries")
                    raise UserError(
                        f"{self.shown_url} still failing after {self.args.retries} retries ({what}); {hint}"
                    ) from None
                delay = min(MAX_BACKOFF_S, self.args.retry_delay * 2 ** attempt)
                delay *= 0.5 + random.random() / 2
                retry_after = _retry_after(exc)
                if retry_after is not None:
                    delay = max(delay, min(retry_after, MAX_BACKOFF_S))
                log(f"retry {attempt + 1}/{self.args.retries} in {delay:.1f} s after {what}")
                time.sleep(delay)
        raise AssertionError("unreachable")

    def _fatal_message(self, exc, what):
        status = getattr(exc, "status_code", None)
        if status in (401, 403):
            hint = f"check the key in ${self.args.api_key_env} and --base-url"
        elif status == 404:
            hint = f"check --base-url and that model '{self.args.model}' exists there"
        elif status in (400, 422):
            hint = "check --model and --temperature for this server"
        else:
            hint = "check --base-url and --model"
        return f"{self.shown_url} refused the request ({what}); {hint}"


_TOKENIZER = None


def clip_token_count(text):
    """Number of CLIP BPE tokens, without the start and end markers."""
    global _TOKENIZER
    if _TOKENIZER is None:
        from open_clip.tokenizer import SimpleTokenizer

        _TOKENIZER = SimpleTokenizer()
    return len(_TOKENIZER.encode(text))


_BULLET = re.compile(r"^(?:[-*+\u2022\u2013]|\d{1,3}[.)]|[A-Za-z][.)])\s+")
_RULE = re.compile(r"^(?:[-*_=]\s*){3,}$")
# A sentence ends at . ! or ? followed by a capital, a digit or an opening
# quote/bracket; "e.g. the" and "approx. 3 mm" therefore stay together.
_SENTENCE_END = re.compile(r"(?<=[.!?])[\"')\]]?\s+(?=[\"'(\[]?[A-Z0-9])")
_PREAMBLE = re.compile(
    r"^(?:sure|certainly|of course|absolutely|great question|here (?:is|are)|as an ai|i (?:am|can|cannot|can't|hope))\b",
    re.IGNORECASE,
)


def _strip_inline_markdown(text):
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", text)
    text = re.sub(r"(\*\*|__)(.+?)\1", r"\2", text)
    text = re.sub(r"(?<![\w*])\*(?!\s)(.+?)(?<!\s)\*(?![\w*])", r"\1", text)
    text = text.replace("`", "").replace("**", "")
    return text


def _paragraphs(text):
    """Lines grouped into items: a blank line, a bullet or a numbered line starts a new one."""
    items, current = [], []
    for raw in text.replace("\r\n", "\n").split("\n"):
        line = raw.strip()
        while line.startswith(">"):
            line = line[1:].strip()
        if not line or _RULE.match(line) or line.startswith("|") or line.startswith("```"):
            if current:
                items.append(" ".join(current))
            current = []
            continue
        if line.startswith("#"):
            # A heading names a topic; it is not a description of the image.
            if current:
                items.append(" ".join(current))
            current = []
            continue
        bullet = _BULLET.match(line)
        if bullet:
            if current:
                items.append(" ".join(current))
            current = [line[bullet.end():]]
        else:
            current.append(line)
    if current:
        items.append(" ".join(current))
    return items


def clean_answer(text, max_tokens=CLIP_TOKEN_LIMIT, count_tokens=clip_token_count):
    """One raw answer as a list of single, markdown-free sentences of at most ``max_tokens`` CLIP tokens."""
    sentences = []
    for item in _paragraphs(text or ""):
        item = _strip_inline_markdown(item)
        for sentence in _SENTENCE_END.split(item):
            sentence = " ".join(sentence.split()).strip(" \"'")
            # Lead-ins to a list ("Key features:") and chatty preambles say nothing visual.
            if not sentence or sentence.endswith(":") or _PREAMBLE.match(sentence):
                continue
            if len(re.findall(r"[A-Za-z]{2,}", sentence)) < MIN_WORDS:
                continue
            sentence = sentence[0].upper() + sentence[1:]
            if sentence[-1] not in ".!?":
                sentence = sentence.rstrip(",;") + "."
            if count_tokens(sentence) > max_tokens:
                continue
            sentences.append(sentence)
    return sentences


def _dedup_key(sentence):
    return " ".join(sentence.lower().split()).rstrip(".!? ")


def clean_class(answers, max_tokens=CLIP_TOKEN_LIMIT, count_tokens=clip_token_count):
    """All answers of one class cleaned and de-duplicated, first occurrence kept, order kept."""
    seen, kept = set(), []
    for answer in answers:
        for sentence in clean_answer(answer, max_tokens, count_tokens):
            key = _dedup_key(sentence)
            if key not in seen:
                seen.add(key)
                kept.append(sentence)
    return kept


def _plan(datasets, args, questions, focus):
    """(entry, output path, [(classname, cache, filled questions)]) per dataset to generate, and the requests still to make."""
    plan, missing = [], 0
    for name in datasets:
        entry = get_entry(name)
        out_path = entry.descriptions or os.path.join(args.out_dir, f"{name}.json")
        if os.path.exists(out_path) and not args.overwrite:
            print(f"skip {name}: {out_path} exists (pass --overwrite to regenerate)")
            continue
        classes = []
        for classname in entry.classnames:
            filled = questions_for(entry, classname, questions, focus, args.questions)
            cache = ClassCache(args.cache_dir, args.model, name, classname)
            missing += sum(
                cache.get(q, i) is None for q in filled for i in range(args.answers_per_question)
            )
            classes.append((classname, cache, filled))
        plan.append((entry, out_path, classes))
    return plan, missing


def generate(args):
    try:
        lookup(args.target, args.root)  # a dataset declared in data becomes known by name
        datasets = resolve_target(args.target)
    except KeyError as e:
        raise UserError(e.args[0]) from None
    questions, focus = load_questions(args.questions)
    # What killed runs left of their atomic writes (cache: <cache-dir>/<model>/<dataset>/<class>.json).
    remove_stale_temp_files(args.out_dir, depth=0)
    remove_stale_temp_files(args.cache_dir, depth=2)
    plan, missing = _plan(datasets, args, questions, focus)
    if not plan:
        return

    api_key = read_api_key(args.api_key_env)
    for _, _, classes in plan:
        for _, cache, _ in classes:
            cache.scrub([api_key, *url_secrets(args.base_url)])
    if missing and not api_key:
        raise UserError(
            f"no API key: set the environment variable {args.api_key_env} "
            "(a local server that ignores keys accepts any value)"
        )
    asker = Asker(args, api_key) if missing else None

    with tqdm(total=missing, desc="requests", unit="req", dynamic_ncols=True) as bar:
        def log_retry(message):
            bar.write(message, file=sys.stderr)

        for entry, out_path, classes in plan:
            descriptions = {}
            for classname, cache, filled in classes:
                answers = []
                for question in filled:
                    for index in range(args.answers_per_question):
                        text = cache.get(question, index)
                        if text is None:
                            bar.set_postfix_str(f"{entry.name}/{readable_classname(classname)}", refresh=False)
                            text = asker.ask(question, log=log_retry)
                            cache.put(question, index, text)
                            bar.update(1)
                        answers.append(text)
                kept = clean_class(answers, args.max_tokens_per_description)
                if not kept:
                    raise UserError(
                        f"class '{classname}' of {entry.name} has no usable description in {len(answers)} answers "
                        f"(see {cache.path}); nothing written for {entry.name}: check the model's answers "
                        "or delete that cache file to ask again"
                    )
                descriptions[classname] = kept
            write_json_atomic(out_path, descriptions, indent=1)
            total = sum(len(v) for v in descriptions.values())
            bar.write(f"wrote {out_path} ({len(descriptions)} classes, {total} descriptions)", file=sys.stdout)


def main(argv=None):
    try:
        args = parse_args(argv)
        generate(args)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
