"""Measure and reorder lem_serve.py's layout (issue 27). Standard library only.

    python testing/layout.py measure [lem_serve.py] [--check]
    python testing/layout.py reorder lem_serve.py [--out PATH]

measure prints the issue's measures: lines per banner section, public docstring
coverage, functions over 50 lines, upward references (a name used in a section
and defined in a later one), and the number of test files. --check exits 1 when
a threshold fails (structured output <= 1,300 lines, docstrings >= 85%, no
function over 50 lines); without it measure always exits 0.

reorder rewrites the file into SPEC's section order. It moves whole top-level
statements (with their leading comments and decorators) by ast line ranges; a
statement SPEC does not name travels with the statement before it and is
printed, so the lead can assign it. It writes the banners, rewrites the module
docstring's layout paragraph, asserts every statement is kept exactly once,
and imports the result in a fresh interpreter (code that runs at import must
come after what it uses). Running it twice gives the same file.
"""

from __future__ import annotations

import argparse
import ast
import collections
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BANNER_RULE = "# " + "-" * 75
STRUCTURED_MAX_LINES = 1300
DOCSTRING_MIN_SHARE = 0.85
FUNCTION_MAX_LINES = 50

# ---------------------------------------------------------------------------
# The target layout. Each section: (title, [entries]). An entry is an exact
# top-level name, or "re:PATTERN" matched (re.fullmatch) against the name.
# Exact names win over patterns; within a section statements follow their
# entry's order, then their order in the file. A subsection of Dialects is a
# section whose title starts with "Dialects: ".
# ---------------------------------------------------------------------------

SPEC: list[tuple[str, list[str]]] = [
    ("Defaults: every tunable in one place", [
        "re:(DEFAULT|MAX|JSON_MAX|SCHEMA_MAX|REGEX_MAX|JSON_MASK|JSON_CONSTRAINT|PROMPT_CACHE"
        "|BATCH_RESERVE|REASONING_PROMPT|FORCED_CALL|MAX_EMBEDDING|EMBEDDING_BATCH"
        "|THINKING_MIN|RAW_ARGUMENTS|SOCKET|POLL|KEEPALIVE|SHUTDOWN_GRACE|PREFILL_STEP"
        "|HEARTBEAT|LIFELINE|RETRY_AFTER|RELEASES|HEADER_TIMEOUT|BODY_TIMEOUT"
        "|CORS_MAX|WINDOW_HEADER|LOOPBACK_HOST|METRICS_BUCKETS)[A-Z0-9_]*",
        "log",
    ]),
    ("Settings and CLI", [
        "Settings", "parse_bind", "parse_origins", "_at_least", "_between", "parse_bytes",
        "parse_bytes_or_auto", "OneLineArgumentParser", "re:_?add_\\w+_flags",
        "build_arg_parser", "TEMPLATE_RESERVED", "parse_template_args", "read_chat_template",
        "sampling_flags", "parse_settings", "check_cache_dir", "runtime_problem",
        "default_model_name", "apply_thread_cap",
    ]),
    ("Errors", [
        "ANTHROPIC_ERROR_TYPES", "APIError", "invalid", "server_busy", "request_timed_out",
        "engine_unavailable", "internal_error", "ClientGone",
    ]),
    ("Structured output: JSON Schema compiled to a character automaton, lifted to token masks", [
        "JSON_WHITESPACE", "JSON_ESCAPES", "HEX_DIGITS", "REFEED", "ESCAPE", "GOOD_ESCAPE", "ECMA_TOKEN",
        "CLASS_ITEM", "REFUSED_TOKENS", "SHORT_ESCAPES", "python_syntax", "DOT", "SHORTHANDS", "SAMPLE_CODES",
        "ANYTHING", "regex_items", "Regex", "shared_regex", "regex_for",
        "ANY_TEXT", "_digits", "_magnitude", "number_bound", "number_regex",
        "Cache", "_track", "Piece", "Literals", "Leaf", "number_leaf",
        "Union", "first_text", "union", "ValueStart", "VALUE", "Frame", "Container", "Object", "Array",
        "json_start",
        "json_advance", "json_complete", "json_closing_text", "_step", "_pop", "_settle",
        "_closing", "SCHEMA_KEYWORDS", "SCHEMA_REFUSED", "KEYWORD_TYPES",
        "re:_(OCTET|H16|YEAR|DATE|TIME|LABEL|HOST|PCHAR|DAYS|HOURS)", "FORMATS",
        "_RELATIVE", "HOSTNAME_MAX_LENGTH", "ANY_STRING", "ANY_NUMBER", "BOOLEAN", "NULL",
        "any_value", "ANY_VALUE", "ANY_OBJECT", "SchemaCompiler", "accepts_text",
        "_is_number", "_format", "_names", "_as_list", "_kinds", "JSON_TYPES", "json_type",
        "_canonical", "compile_schema", "Constraint", "JSON_OBJECT", "schema_constraint", "TokenTable", "token_texts", "_TOKEN_TABLES",
        "_CONSTRAINTS", "token_table", "JsonMasks", "masked", "commitment", "json_constraint",
        "JsonConstraint",
    ]),
    ("Request: every body parsed once into the one request type", [
        "ToolCallRule", "tool_call_rule", "arguments_constraint", "Check", "_is_stop", "_is_logit_bias", "COMMON_CHECKS", "common_checks",
        "UNSUPPORTED_FIELDS", "GenerationRequest", "decode_json_body", "run_checks",
        "template_args", "logprobs_wanted", "sampling_fields", "tool_arguments",
        "output_fields", "parse_tool", "parse_tool_choice", "parse_response_format",
        "MEDIA_PARTS", "chat_window", "EMBEDDING_FORMATS",
        "EMBEDDING_CHECKS", "INPUT_RULE", "EmbeddingRequest", "parse_embedding_request",
        "embedding_input",
    ]),
    ("Prompt and sampling: models, chat templates, tool-call and reasoning parsers, the window", [
        "Model", "load_model", "SoloOptions", "solo_options", "recommended_sampling",
        "vocab_size_of", "token_bytes_of", "gpt2_byte_values",
        "context_length_of", "ChatFormat", "json_objects", "parse_llama_calls",
        "DEEPSEEK_CALL", "parse_deepseek_calls", "MISTRAL_CALL", "parse_mistral_call",
        "mistral_call_id", "CHAT_FORMATS", "chat_format_of", "_chat_format",
        "template_messages", "call_with_text_arguments", "nine_character_ids",
        "machine_memory", "weights_bytes", "kv_token_bytes", "activation_bytes",
        "MemoryPlan", "plan_memory", "render_prompt", "PREFILL_MARK", "prefill_prompt",
        "BILLING_HEADER", "BILLING_NONCES",
        "neutralize_billing_header", "completion_prompt", "check_tool_support",
        "call_opening", "PROMPT_PARAMS", "fit_to_context", "model_identity",
        "local_folder", "file_digest", "fit_to_memory", "kv_reservation",
        "check_token_ids", "POOLING_MODES", "Embedder", "load_embedder", "make_embedder",
        "hidden_state_model", "sentence_transformers_config", "pooling_mode",
        "read_json_file", "embedding_inputs", "EmbeddingJob", "embedding_batches",
        "embed_rows", "pool", "Sampling", "make_sampling", "answer_constraint",
        "literal_tokens", "ToolCallConstraint", "make_token_sampler",
        "openai_penalties", "token_logprobs", "token_bytes", "TextStream",
        "partial_marker_length", "StopScanner", "ReasoningSplitter", "reasoning_splitter",
        "think_opened", "HARMONY_ENDS", "HARMONY_HEADS", "HarmonyChannels", "harmony_channels", "kmp_fallbacks",
        "new_id", "openai_tool_call", "HeldTextScanner", "ToolCallScanner", "HarmonyScanner", "tool_scanner",
    ]),
    # The group sits below the engine that drives it (Batch and Engine call it), so
    # a single-process reader skips one fenced section and everything calls upward.
    ("Group: ranks of an mlx.launch group (fenced: a single process never enters it)", [
        "Insert", "Remove", "Keep", "GroupFailure", "GroupLink", "token_check",
        "rank0_address", "Lifelines", "join_group", "quiet_launcher",
    ]),
    ("Engine: one thread that owns MLX, continuous batching, the prompt cache", [
        "Job", "Sequence", "common_prefix", "cache_length", "cut_cache", "cache_nbytes",
        "cache_capacity", "CacheEntry", "PromptCache", "CacheFolder", "SoloResponse",
        "CacheParts", "CacheSlice", "SoloSequence", "SoloBatch", "KVLedger", "Batch",
        "Engine",
    ]),
    ("Dialects: what they share (block separator, usage, logprobs, SSE)", [
        "BLOCK_SEPARATOR", "usage_of", "TextOffsets", "logprobs_object",
        "sse_event", "SSE_KEEPALIVE", "SSE_DONE", "Writer",
    ]),
    ("Dialects: OpenAI chat/completions (/v1/chat/completions, /v1/completions)", [
        "CHAT_ROLES", "CHAT_CHECKS", "COMPLETION_CHECKS", "parse_generation_request", "chat_prefill",
        "chat_role", "parse_message", "parse_tool_calls", "parse_content", "parse_prompt",
        "ChatWriter", "ChoicesWriter",
    ]),
    ("Dialects: Anthropic messages (/v1/messages)", [
        "MESSAGES_CHECKS", "ANTHROPIC_ROLES", "REPLAYED_BLOCKS", "THINKING_ON",
        "parse_messages_request", "anthropic_prefill", "anthropic_served", "anthropic_thinking",
        "anthropic_system", "anthropic_message", "document_text", "anthropic_tool_use",
        "anthropic_tool_result", "tool_result_part", "anthropic_tool_choice",
        "dialect_tools", "anthropic_usage", "tool_use_block", "SIGNATURE_KEY",
        "thinking_signature", "MessagesWriter",
    ]),
    ("Dialects: OpenAI Responses (/v1/responses)", [
        "RESPONSES_CHECKS", "STATEFUL_FIELDS", "RESPONSES_ROLES", "RESPONSES_TEXT_PARTS",
        "HOSTED_TOOLS", "CUSTOM_TOOL_PARAMETERS", "NAMESPACE_SEPARATOR", "_hosted_logged",
        "parse_responses_request", "responses_echo", "responses_tools", "responses_input",
        "reasoning_item_text", "responses_call", "responses_message",
        "responses_call_output", "responses_tool_choice", "responses_format",
        "responses_usage", "output_text_part", "message_item", "reasoning_item",
        "function_call_item", "response_error", "ResponsesWriter",
        "responses_conversation", "ResponseStore",
    ]),
    ("Dialects: models, embeddings, and each endpoint's writer", [
        "model_capabilities", "anthropic_model_info", "embeddings_reply",
        "encode_embedding", "WRITERS", "writer_for",
    ]),
    ("Metrics: counters and histograms, written as Prometheus text by hand", [
        "Histogram", "Family", "prometheus_text", "gauge", "_escape_label", "_number",
        "resident_memory_bytes", "Metrics",
    ]),
    ("Handler: the HTTP handler", [
        "client_gone", "DeadlineReader", "_SURROGATE", "check_json_value", "gunzip_body",
        "host_name", "Handler", "PAGE_CSP",
    ]),
    ("Server and main()", [
        "LemServer", "AdmissionQueue", "Admission", "log_memory_plan", "load_page",
        "main", "on_stop_signals", "serve", "shut_down", "follow", "__main__",
    ]),
]

LAYOUT_INTRO = "Layout, each section calling only the ones above it:"


# ---------------------------------------------------------------------------
# Reading the file: banner sections and top-level statements
# ---------------------------------------------------------------------------

def banners(lines: list[str]) -> list[tuple[int, str]]:
    """(0-based index of the banner's first rule line, title) for every banner."""
    found = []
    for i in range(len(lines) - 2):
        if (lines[i].startswith("# ----") and lines[i + 2].startswith("# ----")
                and lines[i + 1].startswith("# ") and not lines[i + 1].startswith("# ----")):
            found.append((i, lines[i + 1][2:].strip()))
    return found


def statement_key(node: ast.stmt) -> str | None:
    """The name SPEC places a top-level statement by; None when it has none."""
    if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
        return node.name
    if isinstance(node, (ast.Assign, ast.AnnAssign)):
        targets = node.targets if isinstance(node, ast.Assign) else [node.target]
        if isinstance(targets[0], ast.Name):
            return targets[0].id
    if isinstance(node, ast.If) and "__main__" in ast.unparse(node.test):
        return "__main__"
    return None


def defined_names(node: ast.stmt) -> set[str]:
    """Module-level names a top-level statement binds."""
    if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
        return {node.name}
    names = set()
    if isinstance(node, (ast.Assign, ast.AnnAssign, ast.AugAssign)):
        targets = node.targets if isinstance(node, ast.Assign) else [node.target]
        for target in targets:
            for sub in ast.walk(target):
                if isinstance(sub, ast.Name):
                    names.add(sub.id)
    elif isinstance(node, (ast.Import, ast.ImportFrom)):
        for alias in node.names:
            names.add((alias.asname or alias.name).split(".")[0])
    return names


def _loads(nodes) -> set[str]:
    return {n.id for node in nodes if node is not None for n in ast.walk(node)
            if isinstance(n, ast.Name) and isinstance(n.ctx, ast.Load)}


def references(node: ast.AST) -> tuple[set[str], set[str]]:
    """(names read when the statement executes at import, names read only when called).

    A def's decorators and defaults run at import, its body at call time; a class
    body runs at import except its methods' bodies. Annotations are strings under
    `from __future__ import annotations`, so they run never and count as neither.
    """
    if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
        args = node.args
        now = _loads(getattr(node, "decorator_list", []) + args.defaults
                     + [d for d in args.kw_defaults if d is not None])
        body = node.body if isinstance(node.body, list) else [node.body]
        later: set[str] = set()
        for stmt in body:
            inner_now, inner_later = references(stmt)
            later |= inner_now | inner_later
        return now, later
    if isinstance(node, ast.ClassDef):
        now = _loads(node.decorator_list + node.bases + [k.value for k in node.keywords])
        later = set()
        for stmt in node.body:
            inner_now, inner_later = references(stmt)
            now |= inner_now
            later |= inner_later
        return now, later
    if isinstance(node, (ast.AnnAssign, ast.arg)):
        parts = [node.value] if isinstance(node, ast.AnnAssign) else []
        node = ast.Module(body=[ast.Expr(p) for p in parts if p is not None], type_ignores=[])
    now, later = set(), set()
    for child in ast.iter_child_nodes(node):
        if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda, ast.ClassDef,
                              ast.AnnAssign)):
            inner_now, inner_later = references(child)
            now |= inner_now
            later |= inner_later
        elif isinstance(child, ast.Name) and isinstance(child.ctx, ast.Load):
            now.add(child.id)
        elif isinstance(child, (ast.expr, ast.stmt, ast.comprehension, ast.keyword,
                                ast.excepthandler, ast.withitem, ast.match_case,
                                ast.arguments)):
            inner_now, inner_later = references(child)
            now |= inner_now
            later |= inner_later
    return now, later


# ---------------------------------------------------------------------------
# measure
# ---------------------------------------------------------------------------

def section_of(banner_list: list[tuple[int, str]], lineno: int) -> int:
    """Index of the banner section holding 1-based line lineno (-1: before any banner)."""
    index = -1
    for i, (start, _) in enumerate(banner_list):
        if start + 1 <= lineno:
            index = i
    return index


def public_definitions(tree: ast.Module) -> list[tuple[str, ast.AST]]:
    """Public definitions: top-level functions and classes, methods and nested
    functions, whose own name does not start with '_' (so do_GET and friends
    count, __init__ and _helpers do not), wherever they are nested."""
    found = []

    def visit(node, prefix):
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                name = prefix + child.name
                if not child.name.startswith("_"):
                    found.append((name, child))
                visit(child, name + ".")
            elif isinstance(child, (ast.If, ast.Try, ast.With, ast.For, ast.While)):
                visit(child, prefix)

    visit(tree, "")
    return found


def long_functions(tree: ast.Module) -> list[tuple[str, int]]:
    """Every function or method (at any depth) longer than FUNCTION_MAX_LINES, with its length."""
    found = []

    def visit(node, prefix):
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                name = prefix + child.name
                length = child.end_lineno - child.lineno + 1
                if not isinstance(child, ast.ClassDef) and length > FUNCTION_MAX_LINES:
                    found.append((name, length))
                visit(child, name + ".")
            else:
                visit(child, prefix)

    visit(tree, "")
    return found


def upward_references(tree: ast.Module, lines: list[str]):
    """(at import, at call time): lists of (section, statement, name, defining section)
    where a statement reads a module-level name that a later section defines."""
    banner_list = banners(lines)
    where: dict[str, int] = {}
    for node in tree.body:
        for name in defined_names(node):
            where.setdefault(name, section_of(banner_list, node.lineno))
    now_up, later_up = [], []
    for node in tree.body:
        here = section_of(banner_list, node.lineno)
        now, later = references(node)
        label = statement_key(node) or f"line {node.lineno}"
        for names, out in ((now, now_up), (later - now, later_up)):
            for name in sorted(names):
                if where.get(name, -1) > here:
                    out.append((here, label, name, where[name]))
    return now_up, later_up


def test_files(root: Path) -> list[str]:
    """The pytest files: test_*.py at the root and under testing/."""
    files = sorted(root.glob("test_*.py")) + sorted((root / "testing").glob("test_*.py"))
    return [str(f.relative_to(root)) for f in files]


def measure(path: Path, check: bool) -> int:
    """Print the measures; with check, 1 when a threshold fails, else 0."""
    text = path.read_text()
    lines = text.splitlines()
    tree = ast.parse(text)
    banner_list = banners(lines)
    print(f"{path}: {len(lines)} lines, {len(banner_list)} banner sections")
    structured = 0
    for i, (start, title) in enumerate(banner_list):
        end = banner_list[i + 1][0] if i + 1 < len(banner_list) else len(lines)
        print(f"  {end - start:6d}  {title}")
        if title.lower().startswith("structured output"):
            structured += end - start
    public = public_definitions(tree)
    documented = [name for name, node in public if ast.get_docstring(node)]
    share = len(documented) / max(1, len(public))
    print(f"public docstrings: {len(documented)}/{len(public)} = {share:.1%} (public: every "
          "def/class at any depth whose own name does not start with '_'; do_GET counts)")
    missing = [name for name, node in public if not ast.get_docstring(node)]
    print("  without one: " + (", ".join(missing) if missing else "none"))
    long = long_functions(tree)
    print(f"functions over {FUNCTION_MAX_LINES} lines: {len(long)}")
    for name, length in long:
        print(f"  {length:4d}  {name}")
    now_up, later_up = upward_references(tree, lines)
    titles = [t for _, t in banner_list]
    name_of = lambda i: titles[i] if i >= 0 else "(preamble)"  # noqa: E731
    for label, found in (("at import", now_up), ("at call time", later_up)):
        print(f"upward references {label}: {len(found)}")
        for here, stmt, name, there in found:
            print(f"  [{name_of(here)[:30]}] {stmt} -> {name} [{name_of(there)[:30]}]")
    files = test_files(ROOT)
    print(f"test files: {len(files)} ({', '.join(files)})")
    failures = []
    if structured > STRUCTURED_MAX_LINES:
        failures.append(f"structured output is {structured} lines > {STRUCTURED_MAX_LINES}")
    if share < DOCSTRING_MIN_SHARE:
        failures.append(f"public docstrings {share:.1%} < {DOCSTRING_MIN_SHARE:.0%}")
    if long:
        failures.append(f"{len(long)} functions over {FUNCTION_MAX_LINES} lines")
    for failure in failures:
        print("FAIL: " + failure)
    return 1 if check and failures else 0


# ---------------------------------------------------------------------------
# reorder
# ---------------------------------------------------------------------------

def split_statements(text: str):
    """(preamble lines, [Chunk]) where the preamble is everything before the first banner
    and a chunk is one top-level statement with its leading comments, banners removed."""
    lines = text.splitlines()
    tree = ast.parse(text)
    banner_list = banners(lines)
    banner_lines = {b + k for b, _ in banner_list for k in range(3)}
    first = banner_list[0][0] if banner_list else len(lines)
    chunks = []
    previous_end = 0
    for node in tree.body:
        start = node.lineno - 1
        if getattr(node, "decorator_list", None):
            start = min(start, min(d.lineno for d in node.decorator_list) - 1)
        if start < first:
            previous_end = node.end_lineno
            continue
        lead = [lines[i] for i in range(max(previous_end, first), start)
                if i not in banner_lines]
        blanks = 0
        while lead and not lead[0].strip():
            lead.pop(0)
            blanks += 1
        if not lead:
            blanks = 0
            i = start - 1
            while i >= 0 and not lines[i].strip():
                blanks, i = blanks + 1, i - 1
        body = lines[start:node.end_lineno]
        chunks.append(Chunk(node, lead, body, min(blanks, 2) if blanks or previous_end else 1))
        previous_end = node.end_lineno
    tail = [line for i, line in enumerate(lines[previous_end:], previous_end)
            if i not in banner_lines]
    while tail and not tail[-1].strip():
        tail.pop()
    if tail and chunks:
        chunks[-1].body.extend(tail)
    preamble = lines[:min(first, len(lines))]
    return preamble, chunks


class Chunk:
    """One top-level statement: its node, leading comment lines and source lines."""

    def __init__(self, node: ast.stmt, lead: list[str], body: list[str], blanks: int):
        self.node, self.key, self.body = node, statement_key(node), body
        self.lead, self.blanks = lead, blanks

    def lines(self) -> list[str]:
        return self.lead + self.body

    def spacing(self) -> int:
        """Blank lines before this chunk: two before defs and classes, else as many
        as it had in the file (at most two), so runs of constants stay together."""
        if isinstance(self.node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            return 2
        return self.blanks


def match_spec(chunks: list[Chunk]):
    """({chunk index: (section, entry rank)}, unmatched chunk indexes, unused spec entries)."""
    exact, patterns = {}, []
    for s, (_, entries) in enumerate(SPEC):
        for rank, entry in enumerate(entries):
            if entry.startswith("re:"):
                patterns.append((re.compile(entry[3:]), s, rank))
            else:
                assert entry not in exact, f"SPEC names {entry} twice"
                exact[entry] = (s, rank)
    placed, unmatched, used = {}, [], set()
    for i, chunk in enumerate(chunks):
        spot = exact.get(chunk.key) if chunk.key else None
        if spot is None and chunk.key:
            spot = next(((s, r) for p, s, r in patterns if p.fullmatch(chunk.key)), None)
        if spot is None:
            unmatched.append(i)
        else:
            placed[i] = spot
            used.add(SPEC[spot[0]][1][spot[1]])
    unused = [e for _, entries in SPEC for e in entries if e not in used]
    return placed, unmatched, unused


def layout_paragraph() -> list[str]:
    """The module docstring's layout paragraph, written from SPEC's titles."""
    names, dialects = [], []
    for title, _ in SPEC:
        if title.startswith("Dialects: "):
            if not dialects:
                names.append("")  # where the dialects go
            dialects.append(title[len("Dialects: "):].split(" (")[0])
        else:
            short = title.split(":")[0]
            names.append(short if short.isupper() or short.startswith("CLI") else short[0].lower() + short[1:])
    names = [n or f"dialects, one subsection each ({'; '.join(dialects)})" for n in names]
    words = LAYOUT_INTRO + " " + "; ".join(names) + "."
    out, line = [], ""
    for word in words.split(" "):
        if line and len(line) + 1 + len(word) > 78:
            out.append(line)
            line = word
        else:
            line = f"{line} {word}" if line else word
    return out + [line]


def rewrite_docstring(preamble: list[str]) -> list[str]:
    """The preamble with its docstring's layout paragraph (LAYOUT_INTRO to the closing
    quotes) replaced by layout_paragraph(); unchanged when there is none."""
    try:
        start = next(i for i, l in enumerate(preamble) if l.startswith(LAYOUT_INTRO.split(",")[0]))
    except StopIteration:
        return preamble
    end = next(i for i in range(start, len(preamble)) if preamble[i].strip() == '"""')
    return preamble[:start] + layout_paragraph() + preamble[end:]


def reorder_text(text: str) -> tuple[str, list[str], list[str]]:
    """(reordered source, unmatched statements' descriptions, SPEC entries nothing matched)."""
    preamble, chunks = split_statements(text)
    placed, unmatched, unused = match_spec(chunks)
    if 0 in unmatched:
        raise SystemExit(f"the first statement after the preamble ({chunks[0].key}) is not in SPEC")
    # An unmatched statement travels with the nearest matched statement before it.
    groups: dict[int, list[int]] = collections.OrderedDict()
    owner = None
    for i in range(len(chunks)):
        if i in placed:
            owner = i
            groups[i] = [i]
        else:
            groups[owner].append(i)
    order = sorted(groups, key=lambda i: (placed[i][0], placed[i][1], i))
    out = rewrite_docstring(list(preamble))
    while out and not out[-1].strip():
        out.pop()
    section = None
    for head in order:
        if placed[head][0] != section:
            section = placed[head][0]
            out += ["", "", BANNER_RULE, "# " + SPEC[section][0], BANNER_RULE, ""]
            first = True
        for i in groups[head]:
            if not first:
                out += [""] * chunks[i].spacing()
            first = False
            out += chunks[i].lines()
    notes = [f"{chunks[i].key or ast.unparse(chunks[i].node).splitlines()[0][:60]}"
             f" (line {chunks[i].node.lineno}) travels with "
             f"{chunks[[h for h in groups if i in groups[h]][0]].key}"
             for i in unmatched]
    result = "\n".join(out) + "\n"
    check_same_statements(text, result)
    return result, notes, unused


def statement_dumps(text: str) -> collections.Counter:
    """Multiset of the top-level statements (the module docstring excluded) and comments."""
    tree = ast.parse(text)
    body = tree.body[1:] if ast.get_docstring(tree) else tree.body
    counter = collections.Counter(ast.dump(node) for node in body)
    lines = text.splitlines()
    banner_lines = {b + k for b, _ in banners(lines) for k in range(3)}
    counter.update("comment:" + l.strip() for i, l in enumerate(lines)
                   if l.strip().startswith("#") and i not in banner_lines)
    return counter


def check_same_statements(before: str, after: str) -> None:
    """Raise AssertionError unless after holds exactly before's statements and comments."""
    a, b = statement_dumps(before), statement_dumps(after)
    lost, gained = a - b, b - a
    assert not lost and not gained, (
        f"reorder changed the statements: lost {list(lost)[:3]}, gained {list(gained)[:3]}")


def check_imports(text: str, path: Path) -> None:
    """Import text as a module in a fresh interpreter; SystemExit with its error if it fails."""
    with tempfile.TemporaryDirectory() as folder:
        probe = Path(folder) / path.name
        probe.write_text(text)
        run = subprocess.run(
            [sys.executable, "-c", "import importlib.util as u, sys; "
             f"s = u.spec_from_file_location('layout_probe', {str(probe)!r}); "
             "m = u.module_from_spec(s); sys.modules[s.name] = m; s.loader.exec_module(m)"],
            capture_output=True, text=True, cwd=folder)
        if run.returncode:
            raise SystemExit("the reordered file does not import:\n" + run.stderr[-3000:])


def reorder(path: Path, out: Path | None) -> int:
    """Rewrite path (or write out) in SPEC's order; print what SPEC did not name."""
    text = path.read_text()
    result, notes, unused = reorder_text(text)
    check_imports(result, path)
    again, _, _ = reorder_text(result)
    assert again == result, "reorder is not idempotent"
    tree = ast.parse(result)
    now_up, _ = upward_references(tree, result.splitlines())
    for here, stmt, name, there in now_up:
        print(f"warning: {stmt} reads {name} at import, defined in a later section")
    print(f"{len(notes)} statements not named in SPEC (each travels with the one before it):")
    for note in notes:
        print("  " + note)
    if unused:
        print(f"SPEC entries that matched nothing: {', '.join(unused)}")
    (out or path).write_text(result)
    print(f"wrote {out or path}: {len(result.splitlines())} lines")
    return 0


def main(argv: list[str] | None = None) -> int:
    """Command line: measure or reorder."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    m = sub.add_parser("measure", help="print the layout measures")
    m.add_argument("path", nargs="?", default=str(ROOT / "lem_serve.py"))
    m.add_argument("--check", action="store_true", help="exit 1 when a threshold fails")
    r = sub.add_parser("reorder", help="rewrite the file into SPEC's section order")
    r.add_argument("path")
    r.add_argument("--out", help="write here instead of over path")
    args = parser.parse_args(argv)
    if args.command == "measure":
        return measure(Path(args.path), args.check)
    return reorder(Path(args.path), Path(args.out) if args.out else None)


if __name__ == "__main__":
    sys.exit(main())
