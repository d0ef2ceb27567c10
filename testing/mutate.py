"""Plant known bugs in a copy of lem_serve.py, one at a time, and check that the tests named for them fail.

Each mutation swaps exact pieces of lem_serve.py for broken ones in a temporary copy of the
repository (the real files are never touched), then runs the tests the mutation names against
that copy. The mutation is *caught* when they fail, *missed* when they pass. The named tests are
first run on an unchanged copy: a test that fails there proves nothing, so the run stops.

    python testing/mutate.py                             # every mutation (15-20 minutes on 2 cores)
    python testing/mutate.py gate-plus-one eos-uncounted  # some, by name
    python testing/mutate.py --list

Exits 0 when every mutation run was caught, 1 when one was missed or could not be applied, 2 when
the unchanged copy fails. It does not run in CI; testing/MUTATIONS.md says why it exists.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TARGET = "lem_serve.py"
COPY_IGNORE = shutil.ignore_patterns(".git", ".venv", "__pycache__", ".pytest_cache", ".cache", "artifacts",
                                     "model", "bench", "agents")  # testing/agents: ~800 MB of agent CLIs
RUN_TIMEOUT = 900  # seconds for one pytest run; a mutation that hangs the suite counts as an error


@dataclass(frozen=True)
class Mutation:
    """One planted bug: `edits` are (exact text of `target`, found once; what replaces it)."""

    name: str
    bug: str
    edits: tuple[tuple[str, str], ...]
    tests: tuple[str, ...]  # test functions (every parametrization) that must fail
    target: str = TARGET    # the file the edits apply to (chat.js for the page's own bugs)


MUTATIONS = [
    # The five bugs of issue 11's audit.
    Mutation("api-key-flag-ignored", "--api-key / LEM_API_KEY never reach the settings: the server is left open",
             (("api_key=args.api_key,", "api_key=None,"),),
             ("test_api_key_flag_and_env_guard_the_real_server",)),
    Mutation("default-budget-refused", "a request without max_tokens is refused when the default budget overflows "
                                       "the context, instead of trimmed",
             (("if request.max_tokens_given and request.max_tokens > room:", "if request.max_tokens > room:"),),
             ("test_default_budget_is_trimmed_to_the_context",)),
    Mutation("eos-uncounted", "the end-of-sequence token is left out of completion_tokens",
             (('        if response.finish_reason == "stop":  # an end-of-sequence token: not part of the text\n',
               '        if response.finish_reason == "stop":  # an end-of-sequence token: not part of the text\n'
               "            job.completion_tokens -= 1\n"),),
             ("test_completion_tokens_count_the_end_of_sequence_token",)),
    Mutation("stream-splits-characters", "each token's bytes are decoded on their own, so a character split "
                                         "across tokens goes out as two replacement characters",
             (("return self._trim(self.utf8.decode(token_bytes(self.model, token)))",
               'return self._trim(token_bytes(self.model, token).decode("utf-8", "replace"))'),),
             ("test_stream_chunks_are_whole_characters",)),
    Mutation("gate-plus-one", "the gate admits max_requests + 1 requests",
             (("threading.BoundedSemaphore(settings.max_requests)", "threading.BoundedSemaphore(settings.max_requests + 1)"),),
             ("test_concurrent_admission_never_exceeds_the_limit",)),
    # More of the contract.
    Mutation("gate-released-twice", "a request gives its permit back twice, so the gate grows",
             (("threading.BoundedSemaphore(settings.max_requests)", "threading.Semaphore(settings.max_requests)"),
              ("            if not self.held:\n                return\n", "")),
             ("test_every_way_a_request_ends_gives_back_exactly_its_permit",)),
    Mutation("window-starts-with-assistant", "the chat window keeps the last N messages, whatever their roles",
             (("first = next((n for n in turns if len(others) - n <= keep), turns[-1])", "first = len(others) - keep"),),
             ("test_window_never_starts_with_an_assistant_or_tool_message",)),
    Mutation("validation-after-gate", "the prompt is rendered and fitted after admission: a bad prompt gets 429 "
                                      "while every slot is busy",
             (("        prompt, dropped = render_prompt(request, server.model)\n"
               "        budget = fit_to_memory(len(prompt), fit_to_context(len(prompt), request, server.model), request, server.memory)\n"
               "        if not server.engine.alive:\n"
               "            raise engine_unavailable()\n"
               '        headers = {WINDOW_HEADER: str(dropped)} if request.endpoint == "chat" else {}\n'
               "        kv_bytes = kv_reservation(len(prompt), budget, request, server.memory)\n"
               "        with server.admit(request.n, kv_bytes, gone=lambda: client_gone(self.connection)) as slot:\n",
               "        if not server.engine.alive:\n"
               "            raise engine_unavailable()\n"
               "        kv_bytes = 0\n"
               "        with server.admit(request.n, kv_bytes, gone=lambda: client_gone(self.connection)) as slot:\n"
               "            prompt, dropped = render_prompt(request, server.model)\n"
               "            budget = fit_to_memory(len(prompt), fit_to_context(len(prompt), request, server.model), request, server.memory)\n"
               '            headers = {WINDOW_HEADER: str(dropped)} if request.endpoint == "chat" else {}\n'),),
             ("test_bad_prompts_are_400_even_while_every_slot_is_busy",)),
    Mutation("stop-string-partly-streamed", "text that may be the start of a stop string is streamed at once",
             (("        keep = max(self.matched)\n", "        keep = 0\n"),),
             ("test_stop_string_cuts_text_and_is_never_streamed", "test_stop_scanner_holds_back_partial_stop_strings")),
    Mutation("prompt-cache-whole-prompt", "an exact prompt-cache hit is returned whole, leaving the model no "
                                          "token to run",
             (("shared = min(common_prefix(entry.tokens, wanted), len(prompt) - 1)",
               "shared = common_prefix(entry.tokens, wanted)"),),
             ("test_prompt_that_is_exactly_a_cached_sequence_still_runs_its_last_token",)),
    Mutation("retry-after-missing", "429 comes without Retry-After",
             (('headers={"Retry-After": str(retry_after)})', "headers={})"),),
             ("test_over_the_limit_is_429_at_once",)),
    Mutation("host-check-skipped", "bound to loopback, any Host header is answered (DNS rebinding)",
             (("if hosts and settings.is_loopback and host_name", "if False and hosts and settings.is_loopback and host_name"),),
             ("test_host_check_stops_dns_rebinding_on_loopback",)),
    Mutation("host-check-everywhere", "the loopback Host check also runs on a non-loopback bind, refusing LAN names",
             (("if hosts and settings.is_loopback and host_name", "if hosts and host_name"),),
             ("test_host_check_is_off_on_a_non_loopback_bind",)),
    Mutation("header-deadline-per-read", "the header deadline bounds each read, not the whole request: a "
                                         "slowloris trickle is never cut off",
             (("        if self.deadline is not None:\n            wait = min(wait, self.deadline - time.monotonic())\n",
               ""),),
             ("test_slow_headers_are_cut_off_without_holding_a_slot",)),
    Mutation("client-gone-unnoticed", "a client that leaves while waiting for a non-streamed answer is not noticed",
             (("                if client_gone(self.connection):\n                    raise ClientGone\n", ""),),
             ("test_disconnect_while_waiting_non_streaming_stops_generation_and_is_499_in_metrics",)),
    Mutation("499-uncounted", "a request whose client left before any status is counted as 200 in /metrics",
             (('else "499"', 'else "200"'),),
             ("test_disconnect_while_waiting_non_streaming_stops_generation_and_is_499_in_metrics",)),
    Mutation("keepalive-never-sent", "no keepalive comment while the prompt is processed",
             (("                on_idle()\n", ""),),
             ("test_slow_prompt_stream_gets_keepalives",)),
    Mutation("seed-uses-global-random", "a seeded request draws from the global random state",
             (("key = None if request.seed is None else mx.random.key(request.seed % 2**64)", "key = None"),),
             ("test_same_seed_same_output_inside_a_batch",)),
    Mutation("developer-role-unmapped", "a developer message reaches the template as an unknown role, not as system",
             (('"system" if role == "developer" else role', "role"),),
             ("test_developer_role_is_a_system_message",)),
    Mutation("temperature-above-2", "temperature above 2 is accepted",
             (("lambda v: 0 <= v <= 2)", "lambda v: 0 <= v)"),),
             ("test_bad_fields_are_400",)),
    Mutation("timeout-flag-ignored", "--timeout is parsed and dropped: requests get the default 300 s",
             (("timeout=float(args.timeout)", "timeout=float(DEFAULT_TIMEOUT)"),),
             ("test_timeout_flag_ends_a_request_that_runs_too_long",)),
    Mutation("max-tokens-flag-ignored", "--max-tokens is parsed and dropped",
             (("max_tokens=args.max_tokens,", "max_tokens=DEFAULT_MAX_TOKENS,"),),
             ("test_max_tokens_flag_is_the_default_and_the_ceiling",)),
    Mutation("model-name-default-is-the-path", "without --model-name the model is named by its whole path",
             (("return path.resolve().name if path.exists() else model_path", "return model_path"),),
             ("test_model_name_flag_and_its_folder_name_default",)),
    Mutation("log-level-flag-ignored", "--log-level is parsed and dropped: always info",
             (("level=settings.log_level.upper()", 'level="INFO"'),),
             ("test_log_level_flag_sets_what_is_logged",)),
    Mutation("sigint-not-handled", "only SIGTERM drains; Ctrl-C kills the requests in flight",
             (("signals = (signal.SIGINT, signal.SIGTERM) +", "signals = (signal.SIGTERM,) +"),),
             ("test_signal_during_load_drains_every_request_and_exits_0",)),
    Mutation("drain-does-not-wait", "on a signal the server exits without waiting for requests in flight",
             (("return self.idle.wait_for(lambda: self.in_flight == 0, timeout=grace)", "return True"),),
             ("test_signal_during_load_drains_every_request_and_exits_0",)),
    Mutation("cli-error-with-usage", "a bad command line prints argparse's usage block before the error",
             (("        self.exit(2, f\"{self.prog}: error:", "        self.print_usage(sys.stderr)\n"
                                                          "        self.exit(2, f\"{self.prog}: error:"),),
             ("test_bad_command_lines_exit_2_with_one_line",)),
    # Issue 14: structured output.
    Mutation("json-mask-cache-by-count", "a string's mask is cached under its exact length, so every character "
             "of a bounded string is a cold mask",
             (("count=(min(frame.count, self.min_len), min(room, reach + len(self.regex.edges))))",
               "count=(frame.count, room))"),),
             ("test_counted_strings_reuse_cached_masks",)),
    Mutation("json-unique-literals-repeat", "an enum item of a uniqueItems array may repeat one already written",
             (("        return (t for t in self.texts if t.startswith(text) and (ex is None or t not in ex))",
               "        return (t for t in self.texts if t.startswith(text))"),
              ("        return frame.text in self.texts and (frame.ex is None or frame.text not in frame.ex)",
               "        return frame.text in self.texts")),
             ("test_each_keyword_is_enforced",)),
    Mutation("json-bounds-feasibility-off", "a bounded number's maximum is left out of its regular expression",
             (("for x, is_open, least in ((low, low_open, True), (high, high_open, False))",
               "for x, is_open, least in ((low, low_open, True),)"),),
             ("test_every_walk_through_the_automaton_validates",)),
    Mutation("json-whitespace-unbounded", "whitespace between JSON tokens is not bounded",
             (("JSON_MAX_WHITESPACE = 24 ", "JSON_MAX_WHITESPACE = 99 "),),
             ("test_json_automaton_accepts_exactly_the_schema",)),
    Mutation("json-no-closing", "the constraint never closes the JSON before max_tokens runs out",
             (("lambda: self._spell(json_closing_text(state)))", "lambda: None)"),),
             ("test_json_schema_closes_in_time_or_says_length", "test_too_few_tokens_end_with_length_never_invalid")),
    Mutation("json-closing-too-late", "closing starts when the current closing text just fits, so one token that "
             "commits to a large value leaves too few tokens",
             (("len(plan) + 1 + masks.slack >= self.left", "len(plan) + 1 >= self.left"),),
             ("test_pydantic_and_zod_schemas_always_validate",)),
    Mutation("json-max-length-ignored", "maxLength is not enforced", (("self.limit = math.inf if "
             "max_len is None else max_len", "self.limit = math.inf"),),
             ("test_pydantic_and_zod_schemas_always_validate",)),
    Mutation("json-formats-ignored", "format is an annotation: any string", (("    parts += [(FORMATS[form], False)] "
             "if isinstance(form := schema.get(\"format\"), str) and form in FORMATS else []", "    parts += []"),),
             ("test_pydantic_and_zod_schemas_always_validate",)),
    Mutation("json-extra-keys-repeat-declared", "an extra key may repeat a declared property's name",
             (("keys += [(self.key, self.forbidden | seen)] * extra", "keys += [(self.key, seen)] * extra"),),
             ("test_each_keyword_is_enforced",)),
    Mutation("json-anyof-first-only", "anyOf keeps only its first alternative",
             (("for alt in node.alternatives]", "for alt in node.alternatives[:1]]"),),
             ("test_each_keyword_is_enforced",)),
    Mutation("json-single-space-only", "between JSON tokens only one space, as before issue 14: SmolLM2 writes "
             "other content", (('JSON_WHITESPACE = " \\t\\n\\r"', 'JSON_WHITESPACE = " "'),
                               ("JSON_MAX_WHITESPACE = 24 ", "JSON_MAX_WHITESPACE = 1 ")),
             ("test_smollm2_constraint_keeps_the_models_answer",)),
    # Issue 15: one model sharded over an mlx.launch group, replicas behind nginx.
    Mutation("group-seed-not-shared", "an unseeded request samples from each rank's own random state",
             (("seed = secrets.randbits(63) if request.seed is None else request.seed", "seed = request.seed"),),
             ("test_sharded_unseeded_sampling_agrees_on_every_rank",)),
    Mutation("group-remove-not-replayed", "the other ranks keep sequences rank 0 removed (stop string, client gone)",
             (("        elif isinstance(op, Remove):\n            self.remove(list(op.uids))",
               "        elif isinstance(op, Remove):\n            pass"),),
             ("test_sharded_group_serves_on_rank_0_and_answers_like_one_process",)),
    Mutation("group-settings-not-replayed", "the other ranks sample with default settings, not the request's",
             (("            uid, _cached = self.insert(op.prompt, op.max_tokens, op.request, cached=op.cached, entries=op.entries)",
               "            uid, _cached = self.insert(op.prompt, op.max_tokens, GenerationRequest(\"completions\", "
               "temperature=0), cached=op.cached, entries=op.entries)"),),
             ("test_sharded_group_serves_on_rank_0_and_answers_like_one_process",)),
    Mutation("group-cache-own-budget", "every rank trims its prompt cache to its own byte budget",
             (("        if entries is None:\n            self.fit(limit, PROMPT_CACHE_MAX_ENTRIES, keep=entry)",
               "        if True:\n            self.fit(limit, PROMPT_CACHE_MAX_ENTRIES, keep=entry)"),
              ("            entries = self.prompt_cache.fit(room, entries)",
               "            entries = self.prompt_cache.fit(room, None)")),
             ("test_pipeline_group_evicts_the_cache_entries_rank_0_evicts",)),
    Mutation("group-pipeline-flag-ignored", "--pipeline loads a tensor-parallel shard",
             (("pipeline_group=group if settings.pipeline else None", "pipeline_group=None"),
              ("tensor_group=None if settings.pipeline else group", "tensor_group=group")),
             ("test_pipeline_group_evicts_the_cache_entries_rank_0_evicts",)),
    Mutation("group-no-watchdog", "nothing notices a rank that stalls",
             (('        threading.Thread(target=self._watch_progress, name="lem-watchdog", daemon=True).start()\n', ""),),
             ("test_stalled_rank_ends_requests_in_bounded_time_and_exits_nonzero",)),
    Mutation("group-failure-exits-0", "a failed group's rank 0 exits 0, so a supervisor sees nothing wrong",
             (("server.engine.failure)\n        return 1\n", "server.engine.failure)\n        return 0\n"),),
             ("test_killed_rank_ends_requests_at_once_and_exits_nonzero",)),
    Mutation("group-stop-vote-ignored", "rank 0 ignores another rank's request to drain the group",
             (("            if not self.sent_ahead and self.batch.sync(step):\n                self.drain_requested.set()",
               "            if not self.sent_ahead and self.batch.sync(step):\n                pass"),
              ("        if self.batch.sync(step=True):\n            self.drain_requested.set()",
               "        if self.batch.sync(step=True):\n            pass")),
             ("test_sigterm_drains_the_group_and_it_exits",)),
    Mutation("drain-keeps-listening", "a stopping server keeps its listening socket while it drains",
             (("        self.shutdown()\n        self.socket.close()\n", "        self.shutdown()\n"),),
             ("test_nginx_replica_stopped_mid_stream_finishes_it_while_new_requests_go_elsewhere",)),
    # The agents' dialects (issue 12).
    Mutation("anthropic-errors-in-openai-envelope", "errors on /v1/messages come in OpenAI's envelope",
             (("        if self._anthropic():\n            return error.anthropic_body(getattr(self, \"request_id\", None))\n",
               ""),),
             ("test_bad_messages_bodies_are_anthropic_400s", "test_errors_before_the_route_come_in_the_callers_envelope")),
    Mutation("x-api-key-ignored", "the API key is taken only as a Bearer token, so Claude Code is refused",
             (('offered = [token if scheme.lower() == "bearer" else None, self.headers.get("x-api-key")]',
               'offered = [token if scheme.lower() == "bearer" else None]'),),
             ("test_errors_before_the_route_come_in_the_callers_envelope",)),
    Mutation("stop-sequence-unreported", "a stop sequence ends the message as end_turn, without saying which",
             (("            sequence.job.stop_string = sequence.stops.hit\n", ""),),
             ("test_messages_stop_sequence_cuts_text_and_is_reported",)),
    Mutation("anthropic-input-counts-the-cache", "Anthropic input_tokens include the cached tokens (counted twice)",
             (('return {"input_tokens": job.prompt_tokens - job.cached_tokens,', 'return {"input_tokens": job.prompt_tokens,'),),
             ("test_count_tokens_is_what_a_create_reports",)),
    Mutation("anthropic-block-left-open", "the last content block is not stopped before message_delta",
             (('        return (self._stop() + self._event("message_delta"', '        return (b"" + self._event("message_delta"'),),
             ("test_messages_stream_events_come_in_anthropic_order",)),
    Mutation("responses-text-done-missing", "a Responses stream skips response.output_text.done",
             (('        return (self._event("response.output_text.done", **where, text=part["text"], logprobs=[])\n'
               "                + ", "        return ("),),
             ("test_responses_stream_events_come_in_order_with_sequence_numbers",)),
    Mutation("dialect-max-tokens-unclamped", "/v1/messages takes max_tokens as given: Claude Code's 32000 overflows",
             (("max_tokens=min(body.get(\"max_tokens\") or settings.max_tokens, settings.max_tokens),",
               "max_tokens=body.get(\"max_tokens\") or settings.max_tokens,"),),
             ("test_dialect_max_tokens_is_clamped_not_refused",)),
    Mutation("anthropic-keepalive-is-a-comment", "an Anthropic stream keeps alive with SSE comments, not ping events",
             (('    keepalive = sse_event({"type": "ping"}, "ping")', "    keepalive = SSE_KEEPALIVE"),),
             ("test_slow_prompt_stream_gets_keepalives",)),
    Mutation("previous-response-id-ignored", "previous_response_id is accepted and silently ignored",
             (('    messages += (previous or []) + responses_input(body["input"], kinds)',
               '    messages += responses_input(body["input"], kinds)'),),
             ("test_stored_responses_chain_and_are_bounded",)),
    Mutation("named-tool-not-forced", "Anthropic tool_choice {type: tool} is served as auto",
             (('    if kind == "tool" and isinstance(choice.get("name"), str):\n'
               '        return {"type": "function", "function": {"name": choice["name"]}}',
               '    if kind == "tool" and isinstance(choice.get("name"), str):\n        return "auto"'),),
             ("test_messages_forced_tool_use_round_trip",)),
    Mutation("dialect-error-event-missing", "an Anthropic stream that fails after its headers just ends",
             (('        return self._event("error", error=error.anthropic_error())', '        return b""'),),
             ("test_dialect_stream_past_the_deadline_ends_with_an_error_event",)),
    Mutation("prompt-too-long-worded-otherwise", "a prompt that does not fit is not worded as Anthropic words it",
             (('raise invalid(f"prompt is too long: {prompt_tokens} tokens > {limit - 1} maximum',
               'raise invalid(f"the prompt is {prompt_tokens} tokens > {limit - 1} maximum'),),
             ("test_prompt_longer_than_context_is_400",)),
    # Issue 13: model options (sampling defaults, thinking models, n > 1).
    Mutation("generation-config-ignored", "generation_config.json's recommended sampling is never read",
             (('        config = json.loads((folder / "generation_config.json").read_text(encoding="utf-8"))',
               '        config = {}'),),
             ("test_generation_config_gives_defaults_that_flags_and_requests_override",)),
    Mutation("reasoning-leaks-into-content", "a thinking model's reasoning goes out as answer text",
             (('            out.append(("reasoning" if self.inside else "text", text))',
               '            out.append(("text", text))'),),
             ("test_reasoning_leaves_the_content_stream_or_not",)),
    Mutation("n-takes-one-slot", "a request for n choices takes one generation slot, not n",
             (("        with server.admit(request.n, kv_bytes,", "        with server.admit(1, kv_bytes,"),),
             ("test_each_choice_takes_a_slot",)),
    Mutation("n-choices-all-index-0", "every choice is sent with index 0",
             (('        return {"index": self.index, **content,', '        return {"index": 0, **content,'),),
             ("test_n_choices_stream_with_their_index",)),
    Mutation("n-prompt-run-per-choice", "each choice runs the whole prompt again instead of sharing its KV",
             (("        if job.request.n > 1 and self.prompt_cache is not None:", "        if False:"),),
             ("test_n_greedy_choices_are_identical_and_usage_sums_them",)),
    # Issue 23: the API contracts the SDKs and the agents rely on.
    Mutation("401-retryable", "a 401 lacks x-should-retry: false, so the SDKs and Claude Code retry a wrong key",
             ((', "x-should-retry": "false"})', '})'),),
             ("test_a_wrong_key_is_final_for_both_sdks", "test_claude_code_with_a_wrong_key_asks_once_and_says_so")),
    Mutation("tool-arguments-verbatim", "a tool call's arguments go out as the model wrote them, JSON or not",
             (('    arguments = json.dumps(tool_arguments(call.get("arguments", {}), schema), ensure_ascii=False)',
               '    arguments = call.get("arguments", {})\n'
               '    arguments = arguments if isinstance(arguments, str) else json.dumps(arguments)'),),
             ("test_tool_arguments_that_are_no_json_object_are_wrapped_and_replay",
              "test_codex_goes_on_after_its_model_slips_a_tool_call")),
    Mutation("replayed-arguments-refused", "replayed tool calls whose arguments are no JSON object are a 400",
             (('        arguments = tool_arguments(function.get("arguments") or "{}")',
               '        arguments = json.loads(function.get("arguments") or "{}") if isinstance(function.get('
               '"arguments"), str) else function["arguments"]\n'
               '        if not isinstance(arguments, dict):\n'
               '            raise invalid("arguments are no JSON object", param)'),),
             ("test_tool_arguments_that_are_no_json_object_are_wrapped_and_replay",)),
    Mutation("deferred-tools-rendered", "tools marked defer_loading go into the prompt from the start",
             (('        if not served(tool) or (tool.get("defer_loading") is True and not deferred):',
               '        if not served(tool):'),),
             ("test_tool_reference_loads_a_deferred_tool",)),
    Mutation("message-start-before-admission", "message_start goes out before the engine has read the prompt cache",
             (("    opens_when_admitted = True   # message_start", "    opens_when_admitted = False  # message_start"),),
             ("test_message_start_reports_the_cache_read_the_final_usage_does",)),
    Mutation("responses-failed-timeout-code", "response.failed says code \"timeout\", not one of the API's codes",
             (('    code = "rate_limit_exceeded" if error.status == HTTPStatus.TOO_MANY_REQUESTS else "server_error"',
               '    code = error.code or error.type'),),
             ("test_sdk_types_strictly_for_every_shape_sent",)),
    Mutation("thinking-unasked", "/v1/messages shows thinking blocks without a thinking parameter",
             (('    if kind in (None, "disabled"):\n        return False', '    if kind == "disabled":\n        return False'),),
             ("test_thinking_only_when_asked_and_signed",)),
    Mutation("budget-not-below-max-tokens", "thinking.budget_tokens >= max_tokens is accepted",
             (("        if max_tokens is not None and budget >= max_tokens:", "        if False:"),),
             ("test_thinking_only_when_asked_and_signed",)),
    Mutation("effort-none-ignored", "Responses reasoning.effort \"none\" still reasons",
             (('    if effort == "none":  # asked not to reason', '    if False:  # asked not to reason'),
              ('        show_reasoning=effort != "none",', '        show_reasoning=True,')),
             ("test_thinking_only_when_asked_and_signed",)),
    Mutation("named-tool-choice-echoed-required", "a named tool_choice is echoed back as \"required\"",
             (('            "tool_choice": body.get("tool_choice") or "auto",',
               '            "tool_choice": "required" if isinstance(body.get("tool_choice"), dict) else '
               'body.get("tool_choice") or "auto",'),),
             ("test_the_response_object_repeats_the_request",)),
    Mutation("cut-item-said-completed", "the message cut by the token budget is said to be completed",
             (('        out = self._close_reasoning(status) + self._close_message(status)',
               '        out = self._close_reasoning() + self._close_message()'),),
             ("test_the_response_object_repeats_the_request",)),
    Mutation("no-request-id", "API responses carry no request id",
             (('            self.send_header("request-id" if self._anthropic() else "x-request-id", self.request_id)',
               '            pass'),),
             ("test_every_api_response_names_its_request",)),
    Mutation("models-openai-only", "/v1/models answers in OpenAI's shape even to the anthropic SDK",
             (('            return headers is not None and headers.get("anthropic-version") is not None',
               '            return False'),),
             ("test_the_model_list_in_both_shapes_with_context_and_capabilities",)),
    Mutation("stray-tool-result-accepted", "a tool_result answering no tool_use is accepted",
             (('    if block["tool_use_id"] not in seen_calls:', '    if False:'),),
             ("test_input_hygiene",)),
    Mutation("gzip-bomb-inflated", "a gzip body is inflated without a limit",
             (("        body = inflater.decompress(raw, limit + 1)", "        body = inflater.decompress(raw)"),
              ("    if len(body) > limit:\n        raise APIError(HTTPStatus.REQUEST_ENTITY_TOO_LARGE",
               "    if False:\n        raise APIError(HTTPStatus.REQUEST_ENTITY_TOO_LARGE")),
             ("test_input_hygiene",)),
    Mutation("hosted-tool-forced-quietly", "a tool_choice forcing a hosted tool is served as auto",
             (('    if kind in HOSTED_TOOLS:\n        raise', '    if kind in HOSTED_TOOLS:\n        return "auto"\n        raise'),),
             ("test_codex_tool_kinds",)),
    Mutation("custom-call-as-function", "a custom tool's call comes back as a function_call",
             (('    if kind["kind"] == "custom":\n        parsed', '    if False:\n        parsed'),),
             ("test_codex_tool_kinds",)),
    Mutation("store-unbounded", "the response store keeps every response (no eviction)",
             (("            while len(self.entries) > self.max_count or self.bytes > self.max_bytes:",
               "            while False:"),),
             ("test_stored_responses_chain_and_are_bounded",)),
    Mutation("store-false-kept", "a response made with store: false is kept anyway",
             (('        if final is not None and request.echo.get("store"):', '        if final is not None:'),),
             ("test_stored_responses_chain_and_are_bounded",)),
    # Issue 24: real-world schemas.
    Mutation("json-oneof-as-anyof", "oneOf is enforced as anyOf: an output may match two branches, and a branch "
             "the server cannot enforce is dropped silently",
             (("                    narrowed = narrowed if i == j else self.exclude(narrowed, other, i, j)",
               "                    narrowed = narrowed"),),
             ("test_new_keywords_are_enforced_and_every_walk_validates", "test_oneof_that_cannot_be_exactly_one_is_400")),
    Mutation("json-unknown-keywords-refused", "a keyword the server does not know is a 400, as before issue 24",
             (("        for word in sorted(schema.keys() & SCHEMA_REFUSED)[:1]:",
               "        for word in sorted(schema.keys() - SCHEMA_KEYWORDS - {'title', 'description', '$schema', '$defs'})[:1]:"),),
             ("test_new_keywords_are_enforced_and_every_walk_validates",)),
    Mutation("json-extra-keys-repeat", "an extra key may be written twice in one object",
             (("                                                        ex=frame.ex | {child.text})",
               "                                                        ex=frame.ex)"),),
             ("test_new_keywords_are_enforced_and_every_walk_validates",)),
    Mutation("json-lookahead-ignored", "a leading lookahead is parsed and then ignored",
             (("        looks.append(([start, *body, ANYTHING], op is sre.ASSERT_NOT))",
               "        looks.append(([ANYTHING], False))"),),
             ("test_new_keywords_are_enforced_and_every_walk_validates",)),
    Mutation("regex-dash-beside-shorthand-ranges", "a '-' beside \\d \\w \\s in a class is left a range (re refuses it)",
             (('            dash = "\\\\-" if any(re.fullmatch(r"\\\\[dDwWsS]", end) for end in ends) else "-"',
               '            dash = "-"'),),
             ("test_patterns_are_read_as_ecmascript",)),
    Mutation("regex-brace-comma-quantifier", "'{,' is left to re, which reads x{,2} as up to two x (ECMAScript: "
             "a literal), so output and validator disagree",
             (("                  \"{,\": \"'{,' is a literal", "                  \"{,,\": \"'{,' is a literal"),),
             ("test_unenforceable_schemas_are_400_naming_the_keyword",)),
    Mutation("regex-negated-parts-read-narrowly", "a pattern that must not match (not, (?!...)) reads \\d \\w \\s and "
             "'.' narrowly, so output re would match slips through",
             (("                self.wide, first = negated, self._new()", "                self.wide, first = False, self._new()"),),
             ("test_new_keywords_are_enforced_and_every_walk_validates",)),
    Mutation("regex-named-groups-kept", "(?<name>...) goes to re as (?P<name>...), which refuses a name used twice",
             (('out.append(token[1] or ("(" if token[0].startswith("(?<") else',
               'out.append(token[1] or ("(?P<" + token[0][3:] if token[0].startswith("(?<") else'),),
             ("test_patterns_are_read_as_ecmascript",)),
    Mutation("json-dollar-anchor-ignored", "a '$' inside a pattern does not end the match",
             (("                nxt = ~target if mark < 0 or key == \"$\" else target",
               "                nxt = ~target if mark < 0 else target"),),
             ("test_new_keywords_are_enforced_and_every_walk_validates", "test_each_keyword_is_enforced")),
    Mutation("json-oneof-overlap-unknown-as-apart", "oneOf string branches whose joint Regex is too large to build "
             "are taken as disjoint: an output may match both",
             (('                return str(exc).startswith("the pattern matches nothing")',
               '                return True'),),
             ("test_oneof_that_cannot_be_exactly_one_is_400",)),
    Mutation("json-oneof-search-limit-as-apart", "a search for a text of two string branches that gives up at "
             "REGEX_MAX_SEARCH states reads as 'matches nothing': the branches are taken as disjoint",
             (("            return not self.accepts(current) and len(seen) <= REGEX_MAX_SEARCH",
               "            return not self.accepts(current)"),),
             ("test_oneof_that_cannot_be_exactly_one_is_400",)),
    Mutation("json-min-length-verdict-from-history", "a minLength's compile-time search counts only pairs earlier "
             "requests did not keep: the verdict depends on what was served before",
             (("        if not self.fits(regex.start, 0, True):", "        if not self.fits(regex.start, 0):"),),
             ("test_a_min_length_verdict_does_not_depend_on_earlier_requests",)),
    Mutation("json-kept-completions-unbounded", "a pattern's kept (state, characters left) completions grow without "
             "bound across requests",
             (("len(longer := self.longer) > 4 * REGEX_MAX_SEARCH:", "len(longer := self.longer) > 10**12:"),),
             ("test_a_patterns_kept_completions_stay_bounded",)),
    Mutation("json-huge-const-as-float", "a const integer past a float's range is tested as a float: "
             "OverflowError, a 500",
             (('"integer" if type(v) in (int, float) and v % 1 == 0 else "number")',
               '"integer" if type(v) in (int, float) and float(v).is_integer() else "number")'),
              ('re.escape(str(int(v))) + r"(\.0+)?" if v % 1 == 0', 're.escape(str(int(v))) + r"(\.0+)?" if float(v).is_integer()')),
             ("test_integers_beyond_a_float_in_const_are_served_not_a_500",)),
    Mutation("json-dependencies-ignored", "dependencies / dependentRequired / dependentSchemas constrain nothing",
             (("for w in DEPENDENCIES if isinstance(d := schema.get(w), dict)", "for w in () if isinstance(d := schema.get(w), dict)"),),
             ("test_new_keywords_are_enforced_and_every_walk_validates",)),
    Mutation("json-malformed-type-crashes", "a oneOf branch whose type is not a name crashes the compiler (a 500)",
             (("    kinds = {k for k in _as_list(value) if isinstance(k, str)}",
               "    kinds = set(_as_list(value))"),),
             ("test_malformed_schemas_are_answered_never_a_5xx",)),
    Mutation("json-empty-value-keeps-the-character", "a value complete as soon as it is pushed (one that may be "
             "empty) does not hand the next character to its container",
             (("    if top[0].done(top) and (parent := _settle(stack)):",
               "    if top[0].done(top) and top != top[0].frame(top.ex) and (parent := _settle(stack)):"),),
             ("test_a_value_that_may_be_empty_hands_on_the_next_character",)),
    Mutation("json-closing-key-too-short", "an excluded key leaf looks for a closing text only 32 characters deep, "
             "among the texts it spells out whole, so a pattern key longer than that cannot close (a 500 mid-stream)",
             (("        reach = max(self.min_len - count, len(self.regex.shortest(dfa) or \"\")) + 32",
               "        reach = 32"),
              ("max(self.min_len - count - size, 0))) is not None", "max(self.min_len - count - size, 0))) == \"\""),),
             ("test_new_keywords_are_enforced_and_every_walk_validates",)),
    # Issue 24, large minimum counts: bounded CPU.
    Mutation("json-min-count-uncapped", "minLength, minItems, minProperties, minContains take any count: a client "
             "can make the shortest output (and its search) as large as it likes",
             (("lambda v: type(v) in (int, float) and v % 1 == 0 and 0 <= v <= SCHEMA_MAX_MIN_COUNT)),",
               "lambda v: type(v) in (int, float) and v % 1 == 0 and 0 <= v)),"),),
             ("test_minimums_past_the_cap_are_400_naming_the_keyword",)),
    Mutation("json-min-text-uncapped", "nested minimums multiply unchecked: the shortest array of arrays is built "
             "whatever its length", (("tail = self.finish(self.frame(), SCHEMA_MAX_MIN_TEXT)",
                                      "tail = self.finish(self.frame())"),),
             ("test_minimums_past_the_cap_are_400_naming_the_keyword",)),
    Mutation("json-min-length-completion-ignored", "a string's completion ignores minLength: the closing text is too "
             "short, so a long minLength never closes in time",
             (("(end := self.regex.shortest(state, max(self.min_len - count - size, 0)))",
               "(end := self.regex.shortest(state))"),),
             ("test_long_min_length_is_served_and_closes_exactly_at_it",)),
    Mutation("json-multipleof-float-steps", "multipleOf 0.01 allows 7.77, which validators' float division refuses",
             (("            (exact.denominator == 1 or Fraction(float(exact)) != exact)",
               "            (exact.denominator == 1)"),),
             ("test_new_keywords_are_enforced_and_every_walk_validates",)),
    Mutation("json-contains-ignored", "contains / minContains / maxContains constrain nothing",
             (("        if \"contains\" in schema:   # the first minContains items match it",
               "        if False:   # the first minContains items match it"),),
             ("test_new_keywords_are_enforced_and_every_walk_validates",)),
    Mutation("json-anchor-as-root", "a $ref to an $anchor (\"#name\") is read as the root schema",
             (("        todo, target = [self.root], self.root if ref[1:2] in (\"\", \"/\") else None",
               "        todo, target = [self.root], self.root"),),
             ("test_new_keywords_are_enforced_and_every_walk_validates",)),
    Mutation("json-not-bounds-refused", "`not` of a bound or length is refused, so an if/then/else whose then-branch "
             "is empty is a 400 though its else-branch (the if's negation) has values",
             (("            elif word in NEGATED_BOUNDS and type(value) in (int, float):", "            elif False:"),),
             ("test_if_then_else_with_one_empty_branch_is_served",)),
    # Issue 21: the prompt cache's budget, the admission queue, memory.
    Mutation("prompt-cache-drops-whole", "an entry larger than the prompt cache's budget is dropped, not cut to "
                                         "the longest prefix that fits",
             (("kept = limit * length // max(entry.nbytes, 1)  # bytes grow linearly with tokens", "kept = 0"),),
             ("test_over_budget_prompt_keeps_its_longest_prefix",)),
    Mutation("prompt-cache-cut-by-offset", "a cut entry keeps its whole arrays (only the offset moves), so no memory "
                                           "is freed",
             (("piece.keys, piece.values = cut(layer.keys), cut(layer.values)",
               "piece.keys, piece.values = layer.keys, layer.values"),),
             ("test_over_budget_prompt_keeps_its_longest_prefix",)),
    Mutation("prompt-cache-not-lru", "a cache hit does not make its entry the most recently used",
             (("        self.entries[key] = self.entries.pop(key)\n", "        pass\n"),),
             ("test_eviction_is_least_recently_used_first",)),
    Mutation("prompt-cache-budget-fixed", "the default prompt cache budget is a fixed 1 GiB, whatever the memory",
             (("cache = kv - min(kv // 2, settings.max_requests * BATCH_RESERVE_TOKENS * token)",
               "cache = 1 << 30"),),
             ("test_default_budget_is_sized_from_memory_and_logged",)),
    Mutation("prompt-cache-ignores-batch", "the prompt cache keeps its entries while the running batch needs the "
                                           "memory",
             (("        if self.ledger is None:\n            return None\n        job =",
               "        if True:\n            return None\n        job ="),),
             ("test_admission_waits_for_kv_room_and_refuses_what_never_fits",)),
    Mutation("prompt-cache-fit-before-fetch", "the cache makes room for a new request before it is read, so the "
                                              "prefix that request needed is gone",
             (("            cache, found = self.prompt_cache.fetch(prompt)\n"
               "            room = self.room(None) if entries is None else None\n"
               "            entries = self.prompt_cache.fit(room, entries)\n",
               "            room = self.room(None) if entries is None else None\n"
               "            entries = self.prompt_cache.fit(room, entries)\n"
               "            cache, found = self.prompt_cache.fetch(prompt)\n"),),
             ("test_a_prefix_is_reused_even_when_its_request_needs_the_cache_memory",)),
    Mutation("prompt-cache-dir-not-restored", "saved prefixes are written but never read back after a restart",
             (("        self._restore_saved()\n        self.started.set()\n", "        self.started.set()\n"),),
             ("test_prompt_cache_dir_outlives_a_restart",)),
    Mutation("prompt-cache-dir-not-saved-at-shutdown", "entries not written while serving are lost at shutdown",
             (("                        self.folder.save_all(self.prompt_cache)\n", "                        pass\n"),),
             ("test_prompt_cache_dir_outlives_a_restart",)),
    Mutation("saved-cache-identity-unchecked", "a saved KV cache of another model (or other settings) is loaded",
             (('            if metadata.get("identity") != self.identity:\n', "            if False:\n"),),
             ("test_saved_caches_that_are_corrupt_truncated_or_foreign_are_skipped",)),
    Mutation("idle-rank-spins", "an idle rank polls for rank 0's next share (inside the collective, or on its "
             "lifeline's frames) instead of blocking",
             (("        elif self.idle and self.bells:\n            self.rung.acquire()\n", ""),
              ("                piece = self.bells[0].recv(count - len(data))\n",
               "                self.bells[0].setblocking(False)\n                while True:\n"
               "                    with contextlib.suppress(BlockingIOError):\n"
               "                        piece = self.bells[0].recv(count - len(data))\n                        break\n")),
             ("test_idle_ranks_block_instead_of_polling",)),
    Mutation("launcher-main-thread-only", "only mlx.launch's main thread is reniced (Linux nice is per thread): "
             "its busy relay threads keep competing with the ranks",
             (("        for thread in threads:\n            os.setpriority(os.PRIO_PROCESS, thread, 19)\n",
               "        for thread in threads[:1]:\n            os.setpriority(os.PRIO_PROCESS, thread, 19)\n"),),
             ("test_busy_polling_launcher_is_reniced_below_the_ranks",)),
    Mutation("launcher-nice-only", "mlx.launch's threads get nice 19 but stay in the normal class: a running one "
                                   "keeps its time slice while a rank thread that a collective woke waits",
             (("                os.sched_setscheduler(thread, os.SCHED_IDLE, os.sched_param(0))\n",
               "                pass\n"),),
             ("test_busy_polling_launcher_is_reniced_below_the_ranks",)),
    Mutation("group-vote-not-sent", "rank 1's stop vote never reaches rank 0 when shares travel on the lifelines",
             (("                self.bells[0].sendall(self.VOTE)\n", "                pass\n"),),
             ("test_sigterm_drains_the_group_and_it_exits",)),
    Mutation("hub-identity-by-name", "a Hub model's saved caches are keyed to its repo id, not its files: a new "
                                     "revision reuses the old one's KV",
             (("        folder = local_folder(name)\n",
               "        folder = Path(name) if name and Path(name).is_dir() else None\n"),),
             ("test_a_hub_models_identity_follows_its_downloaded_files",)),
    Mutation("queue-timeout-ignored", "a request finding no free slot gets 429 at once whatever --queue-timeout says",
             (("self.queue.enter(slots, kv_bytes, self.settings.queue_timeout, gone)",
               "self.queue.enter(slots, kv_bytes, 0, gone)"),),
             ("test_a_request_finding_no_slot_waits_then_runs",)),
    Mutation("queue-last-come-first", "the newest waiting request is admitted first",
             (("            self.line.append(ticket)\n", "            self.line.appendleft(ticket)\n"),),
             ("test_queue_is_first_come_first_served_and_forgets_who_left",)),
    Mutation("queue-keeps-the-departed", "a client that hangs up while waiting keeps its place in the queue",
             (("                    if gone():\n                        raise ClientGone\n", ""),),
             ("test_queue_is_first_come_first_served_and_forgets_who_left",)),
    Mutation("kv-not-reserved", "a request is admitted with a free slot even when its KV cache does not fit beside "
                                "the running batch",
             (("if taken == slots and self.ledger.reserve(kv_bytes):", "if taken == slots:"),),
             ("test_admission_waits_for_kv_room_and_refuses_what_never_fits",)),
    Mutation("never-fits-accepted", "a request whose max_tokens can never fit in memory is trimmed instead of refused",
             (("    if request.max_tokens_given and prompt_tokens + budget > room:\n",
               "    if False:\n"),),
             ("test_admission_waits_for_kv_room_and_refuses_what_never_fits",)),
    Mutation("billing-nonce-kept", "Claude Code's per-request cch= nonce reaches the prompt",
             (("    messages = neutralize_billing_header([dict(m) for m in kept])\n",
               "    messages = [dict(m) for m in kept]\n"),),
             ("test_claude_code_billing_nonce_does_not_break_the_shared_prefix",)),
    Mutation("forced-call-ends-at-marker-in-string", "a call's end marker is found by scanning the text, "
                                                     "inside the arguments' strings too",
             (("        if self.form.write is None:\n            return min(",
               "        if True:\n            return min("),),
             ("test_forced_call_string_holding_the_end_marker_stays_one_call",)),
    Mutation("forced-call-inside-reasoning", "a forced call starts at the first token, inside the thinking block "
                                             "the template opened",
             (("        if rule.forced and not self.thinking:\n", "        if rule.forced:\n"),),
             ("test_forced_call_succeeds_for_every_seed",)),
    Mutation("lazy-grammar-never-activates", "a strict tool's call is never constrained: its start marker is not seen",
             (("        elif not self.thinking and not self.rule.forced and self.recent.endswith(self.opening):\n",
               "        elif False:\n"),),
             ("test_strict_tool_arguments_follow_the_schema_once_the_call_opens",)),
    Mutation("lazy-grammar-inside-reasoning", "a strict tool's call marker inside the reasoning starts the constraint",
             (("        elif self.think and not self.thinking and self.recent.endswith(self.think[0]):\n"
               "            self.thinking = True\n",
               "        elif False:\n            pass\n"),
              ("        elif not self.thinking and not self.rule.forced and self.recent.endswith(self.opening):\n",
               "        elif not self.rule.forced and self.recent.endswith(self.opening):\n")),
             ("test_strict_tool_marker_inside_reasoning_stays_reasoning",)),
    Mutation("forced-call-arguments-cut", "the call's tail is forced before its arguments' constraint says they are whole",
             (("        if not self.complete:\n            return held\n",
               "        if not self.complete and self.left > 30:\n            return held\n"),),
             ("test_forced_call_succeeds_for_every_seed",)),
    Mutation("structured-output-inside-reasoning", "response_format's JSON starts at the first token, inside the "
                                                   "thinking block the template opened",
             (("    header, thinking = (form.answer if form else \"\"), chat and think_opened(",
               "    header, thinking = \"\", False and think_opened("),),
             ("test_structured_output_follows_the_reasoning",)),
    Mutation("harmony-answer-unheaded", "gpt-oss's constrained JSON is written without its final-channel header",
             (('        "harmony", harmony=True, answer="<|channel|>final<|message|>",\n',
               '        "harmony", harmony=True,\n'),),
             ("test_structured_output_in_harmonys_final_channel",)),
    # Issue 26: /v1/embeddings.
    Mutation("embed-last-token-of-padding", "last-token pooling reads each padded row's final position, the padding's",
             (("return hidden[mx.arange(hidden.shape[0]), lengths - 1]", "return hidden[:, -1]"),),
             ("test_embeddings_equal_a_direct_forward_pass",)),
    Mutation("embed-mean-over-padding", "mean pooling averages the padding too",
             (("return (hidden * mask[..., None]).sum(axis=1) / lengths[:, None].astype(hidden.dtype)",
               "return hidden.mean(axis=1)"),),
             ("test_embedding_model_flag_pools_as_its_sentence_transformers_config",)),
    Mutation("embed-out-of-order", "vectors come back in the engine's batch order (shortest first), not input order",
             (("        for i, vector in zip(rows, pooled):\n            job.vectors[i] = vector\n",
               "        for vector in pooled:\n            job.vectors[job.vectors.index(None)] = vector\n"),),
             ("test_embeddings_equal_a_direct_forward_pass", "test_inputs_over_several_passes_come_back_in_input_order")),
    Mutation("embed-not-normalized", "vectors are never L2-normalized",
             (("    if embedder.normalize:\n        pooled = pooled / mx.maximum(", "    if False:\n        pooled = pooled / mx.maximum("),),
             ("test_embeddings_equal_a_direct_forward_pass",)),
    Mutation("embed-normalize-module-ignored", "a sentence-transformers folder without a Normalize module is normalized",
             (('    return pooling, "Normalize" in kinds, prompts', "    return pooling, True, prompts"),),
             ("test_embedding_model_flag_pools_as_its_sentence_transformers_config",)),
    Mutation("embed-dimensions-not-renormalized", "dimensions cuts the normalized vector and leaves it shorter than 1",
             (("    pooled = pooled[:, :dimensions] if dimensions else pooled\n    if embedder.normalize:\n"
               "        pooled = pooled / mx.maximum(mx.linalg.norm(pooled, axis=-1, keepdims=True), 1e-12)\n",
               "    if embedder.normalize:\n"
               "        pooled = pooled / mx.maximum(mx.linalg.norm(pooled, axis=-1, keepdims=True), 1e-12)\n"
               "    pooled = pooled[:, :dimensions] if dimensions else pooled\n"),),
             ("test_dimensions_truncate_and_renormalize",)),
    Mutation("embed-base64-big-endian", "base64 vectors are big-endian float32",
             (('    if sys.byteorder == "big":\n        packed.byteswap()', "    packed.byteswap()"),),
             ("test_base64_is_the_float_vector_as_little_endian_float32", "test_openai_sdk_embeddings_create")),
    Mutation("embed-bypasses-gate", "embeddings run without taking a generation slot",
             (("        with server.admit(1, gone=lambda: client_gone(self.connection)) as slot:\n"
               "            job = EmbeddingJob(",
               "        with Admission(server, 0) as slot:\n            job = EmbeddingJob("),),
             ("test_embeddings_take_a_generation_slot_and_are_counted",)),
    Mutation("embed-token-limit-ignored", "--max-embedding-tokens is not applied, only the model's context",
             (("        inputs = embedding_inputs(request, embedder, embedder.max_tokens(server.settings.max_embedding_tokens))",
               "        inputs = embedding_inputs(request, embedder, embedder.context_length or 10**9)"),),
             ("test_bad_embedding_inputs_are_400",)),
    Mutation("embedding-model-flag-ignored", "--embedding-model never reaches the settings: the chat model embeds",
             (("embedding_model=args.embedding_model,", "embedding_model=None,"),),
             ("test_embedding_model_flag_pools_as_its_sentence_transformers_config",)),
    # Issue 22: model families (tool calls and reasoning in each family's own format).
    Mutation("empty-end-marker-found-at-once", "a format without an end marker (Mistral, Llama 3) takes \"\" as "
                                               "found at once, so its calls reach the client as text",
             (("        at = self._end_at((form.end,) if form.end else form.starts)\n",
               "        at = self._end_at((form.end,))\n"),),
             ("test_family_replies_split_into_content_reasoning_and_calls",
              "test_family_markers_split_anywhere_never_reach_content")),
    Mutation("harmony-analysis-as-text", "gpt-oss's analysis channel goes out as the reply's text",
             (('            self.kind = "reasoning" if channel and channel[1] == "analysis" else "text"',
               '            self.kind = "text"'),),
             ("test_family_replies_split_into_content_reasoning_and_calls", "test_codex_is_served_by_a_gpt_oss_model")),
    Mutation("split-marker-leaks", "text that may be the start of a call marker is not held back",
             (("            hold = partial_marker_length(self.held, form.starts + (form.leading if self.fresh else ()))",
               "            hold = 0"),),
             ("test_family_markers_split_anywhere_never_reach_content",)),
    Mutation("thinking-blocks-dropped", "replayed Anthropic thinking blocks never reach the template",
             (("    if thoughts:   # replayed reasoning", "    if False:   # replayed reasoning"),),
             ("test_family_prompt_is_the_templates_own_rendering",)),
    Mutation("reasoning-items-dropped", "replayed Responses reasoning items never reach the template",
             (("            thoughts.append(reasoning_item_text(item))", "            pass"),),
             ("test_family_prompt_is_the_templates_own_rendering",)),
    Mutation("no-alternation-merge", "consecutive messages of one role reach a template that demands alternation",
             (('        if ("must alternate" in template and plain', "        if (False and plain"),),
             ("test_consecutive_messages_of_one_role_are_merged_where_the_template_alternates",)),
    Mutation("deepseek-arguments-as-objects", "DeepSeek's templates get a call's arguments as an object (a 400)",
             (("""        if message.get("tool_calls") and re.search(""", """        if False and re.search("""),),
             ("test_family_prompt_is_the_templates_own_rendering",)),
    Mutation("harmony-reasoning-uncounted", "gpt-oss's analysis tokens are counted as 0 reasoning tokens in usage",
             (("    return HarmonyChannels() if form is not None and form.harmony else None",
               "    return None"),),
             ("test_gpt_oss_analysis_tokens_count_as_reasoning",)),
    Mutation("gemma-word-keys-only", "Gemma 4 calls are read by mlx_lm's parser, which takes only \\w+ keys and "
                                     "[\\w-]+ names: a call to files.read or with a file-path key is lost",
             (('    (("<|tool_call>call:",), ChatFormat(', '    (("<|tool_call>call:" * 2,), ChatFormat('),),
             ("test_family_replies_split_into_content_reasoning_and_calls",
              "test_family_markers_split_anywhere_never_reach_content")),
    Mutation("gemma-tool-results-unfolded", "Gemma 4's first template gets tool results as role \"tool\" messages, "
                                            "which it renders as turns of their own",
             (('    if "tool_responses" in template and "tool_call_id" not in template:',
               '    if False:'),),
             ("test_family_prompt_is_the_templates_own_rendering",
              "test_gemma_4_first_template_gets_tool_results_on_the_calling_turn")),
    Mutation("gemma-answer-own-turn", "after a tool result, the answer reaches Gemma 4's first template as a model "
                                      "turn of its own (the calling turn is never closed)",
             (('        elif (message["role"] == "assistant" and last.get("tool_responses")',
               '        elif (False and last.get("tool_responses")'),),
             ("test_gemma_4_first_template_gets_tool_results_on_the_calling_turn",)),
    Mutation("call-parsed-without-tools", "a call is parsed without the request's tools, so a value written as bare "
                                          "text (Qwen3-Coder's 3, true) is not read by the tool's schema",
             (("            parsed = self.form.parse(body, self.tools)",
               "            parsed = self.form.parse(body, None)"),),
             ("test_family_replies_split_into_content_reasoning_and_calls",)),
    Mutation("quoted-think-end-dropped", "an end-of-reasoning marker that text follows (an answer quoting "
                                         "\"</think>\") is dropped from the answer",
             (("            self._take(out, self.held[:at + len(marker) * (stray and bool(rest.strip()))])",
               "            self._take(out, self.held[:at])"),),
             ("test_family_replies_split_into_content_reasoning_and_calls",)),
    Mutation("stray-think-end-shown", "an end-of-reasoning marker with no start (Gemma 4's trailing <channel|>) "
                                      "reaches the answer",
             (("        found = [(at, m) for m in self.markers[self.inside:] if (at := self.held.find(m)) >= 0]",
               "        found = [(at, m) for m in self.markers[self.inside:][:1] if (at := self.held.find(m)) >= 0]"),),
             ("test_family_replies_split_into_content_reasoning_and_calls",)),
    Mutation("gemma-model-turn-missing", "after a call with text and its result, Gemma 4's prompt ends with the turn "
                                         "closed and no model-turn header",
             (('    if "<|turn>model\\\\n" not in template or', '    if True or'),),
             ("test_gemma_4_reply_after_a_call_with_text_gets_its_own_turn",)),
    # Issue 22: forced and strict calls written in each family's own syntax (key/value arguments, Kimi-K2).
    Mutation("pair-raw-value-holds-closer", "a raw argument value may hold the marker that ends it (or the call), "
                                            "so the call is cut there",
             (("    banned = tuple((re.escape(closer), True, True) for closer in syntax.closers) + tuple(",
               "    banned = () + tuple("),),
             ("test_forced_call_in_each_familys_own_syntax",)),
    Mutation("pair-value-left-open", "a raw argument value that could go on is never ended for the rest of the call",
             (("        if self.left <= self.after:   # a value that could go on", "        if False:   # a value that could go on"),),
             ("test_forced_call_holds_every_argument_in_the_familys_own_syntax",)),
    Mutation("glm-strings-as-json", "GLM's string arguments are written as JSON strings, which its parser keeps quoted",
             (('raw=lambda schema: schema.get("type") == "string")   # its parser\'s own test',
               'raw=lambda schema: False)'),),
             ("test_forced_call_holds_every_argument_in_the_familys_own_syntax",)),
    Mutation("pair-blank-edges-kept", "a raw argument value may start or end with a blank, which the parser strips",
             (("        return Constraint(Leaf(shared_regex(node.regex.source + banned + (edges,)), max(node.min_len, 1),",
               "        return Constraint(Leaf(shared_regex(node.regex.source + banned), max(node.min_len, 1),"),),
             ("test_forced_call_holds_every_argument_in_the_familys_own_syntax",)),
    Mutation("pair-required-skipped", "a key/value call may leave out a required argument",
             (("            if params[index][2]:\n                break\n", "            if False:\n                break\n"),),
             ("test_forced_call_holds_every_argument_in_the_familys_own_syntax",)),
    Mutation("pair-schema-unchecked", "a schema a key/value call cannot hold to is not refused before generation",
             (("    for name, schema in rule.schemas if rule is not None and form.pairs is not None else ():",
               "    for name, schema in ():"),),
             ("test_forced_call_holds_every_argument_in_the_familys_own_syntax",)),
    Mutation("pair-value-led-by-blank", "a key/value call's value may start with a blank (JSON allows one), which "
                                        "Qwen3-Coder's and Gemma 4's parsers keep",
             (("        if first and self.plan is not None:   # JSON lets blanks lead a value",
               "        if False:   # JSON lets blanks lead a value"),),
             ("test_forced_call_holds_every_argument_in_the_familys_own_syntax",)),
    Mutation("glm47-written-as-glm46", "GLM-4.7's calls are written with GLM-4.6's newlines, not as its template writes them",
             (('    "glm47": (GLM47_PAIRS, GLM_PAIRS),', '    "glm47": (GLM_PAIRS,),'),),
             ("test_forced_call_holds_every_argument_in_the_familys_own_syntax",)),
    Mutation("pair-lazy-opening-missed", "a strict tool in a key/value family is never held: its call's opening "
                                         "is not the family's start marker",
             (('    before = form.write("lem_probe")[0] if form.write else form.pairs.head.format(name="lem_probe")',
               '    before = form.write("lem_probe")[0] if form.write else "<lem-never>"'),),
             ("test_strict_tool_in_key_value_syntax_follows_the_schema_once_the_call_opens",)),
    Mutation("pair-nullable-string-refused", "a string-or-null argument (Pydantic's Optional[str]) cannot be "
                                             "written in MiniMax-M2's or Gemma 4's syntax",
             (("    if syntax.nullable and isinstance(string, dict)", "    if False and isinstance(string, dict)"),),
             ("test_forced_call_holds_every_argument_in_the_familys_own_syntax",)),
    Mutation("kimi-call-unwritten", "Kimi-K2's calls (JSON arguments between special tokens) cannot be forced",
             (('    "kimi_k2": (lambda start, end, name:', '    "kimi_k2_off": (lambda start, end, name:'),),
             ("test_forced_call_in_each_familys_own_syntax", "test_forced_call_holds_every_argument_in_the_familys_own_syntax")),
    # Issue 25: the chat page for a working day (edits in chat.js).
    Mutation("tabs-last-writer-wins", "a tab writes its whole copy of a chat over the stored one: "
                                      "a reply streaming in another tab loses the other tab's turn",
             (("      merged = stored ? mergeStored(conv, stored, true) : null;", "      merged = null;"),),
             ("test_two_tabs_on_one_chat_keep_both_replies_and_escape_stops",
              "test_a_turn_another_tab_added_stays_that_tabs_to_edit"), target="chat.js"),
    Mutation("remote-stream-interrupted", "a reply streaming in another tab is read as interrupted",
             (("    const live = id && raw.status === \"streaming\" && (store.live.has(id) || store.keepStreaming);",
               "    const live = false;"),),
             ("test_two_tabs_on_one_chat_keep_both_replies_and_escape_stops",), target="chat.js"),
    Mutation("edit-conflict-overwrites", "an edit saved over another tab's newer edit of the same message wins silently",
             (("    if (state.editing && state.editing.base !== msg.content) {", "    if (false) {"),),
             ("test_a_tab_changing_a_message_another_tab_changed_keeps_the_draft",), target="chat.js"),
    Mutation("edit-send-drops-branch", "Edit + Send replaces the messages after the edited one (no branch)",
             (("    startVariant(conv, msg, { content: text, created: msg.created, edited: Date.now() });",
               "    msg.content = text;\n    conv.messages.splice(conv.messages.indexOf(msg) + 1);"),),
             ("test_edit_at_message_2_of_6_keeps_the_old_branch",), target="chat.js"),
    Mutation("reasoning-only-reply-dropped", "Regenerate drops a reply that has reasoning but no answer",
             (("!msg.content && !msg.reasoning && !msg.error) all.splice", "!msg.content) all.splice"),),
             ("test_a_reasoning_only_reply_survives_regenerate",), target="chat.js"),
    Mutation("import-stats-unchecked", "an imported reply's stats are kept whatever their types",
             (("      if (Number.isFinite(raw[key]) && raw[key] >= 0) stats[key] = raw[key];",
               "      if (key in raw) stats[key] = raw[key];"),),
             ("test_a_crafted_import_and_corrupt_storage_leave_a_working_page",), target="chat.js"),
    Mutation("code-not-highlighted", "code blocks show as plain text",
             (("    if (!lang || code.length > HL_MAX_CHARS) {", "    if (true) {"),),
             ("test_code_is_highlighted_with_copy_buttons_and_math_is_mathml",), target="chat.js"),
    Mutation("math-not-rendered", "$...$ and $$...$$ show as their TeX source",
             (("    if (!MATH_NS || tex.length > MATH_MAX_CHARS) return null;", "    return null;"),),
             ("test_code_is_highlighted_with_copy_buttons_and_math_is_mathml",), target="chat.js"),
    Mutation("continue-starts-a-new-reply", "Continue replaces the cut reply instead of extending it",
             (("    delete msg.finishReason;\n    msg.status = \"streaming\";",
               "    delete msg.finishReason;\n    msg.content = \"\";\n    msg.status = \"streaming\";"),),
             ("test_continue_extends_the_same_message",), target="chat.js"),
    Mutation("continue-asks-in-a-user-turn", "Continue sends a \"continue\" user turn after the cut reply "
                                             "instead of ending the request with it",
             (("    request.messages.push(cut);", "    request.messages.push(cut, { role: \"user\", content: \"Continue.\" });"),),
             ("test_continue_extends_the_same_message",), target="chat.js"),
    Mutation("continue-drops-reasoning", "Continue sends a reply cut while thinking without its reasoning",
             (("    if (msg.reasoning) cut.reasoning_content = msg.reasoning;\n", ""),),
             ("test_continue_sends_a_reply_cut_while_thinking_with_its_reasoning",), target="chat.js"),
    Mutation("attachment-not-sent", "an attached file shows as a chip but is left out of the message",
             (("    for (const file of attachments) parts.push(attachmentBlock(file));", ""),),
             ("test_an_attached_file_goes_into_the_request",), target="chat.js"),
    Mutation("settings-shared-by-all-chats", "a chat's settings are the global ones",
             (("    return { ...state.settings, ...(conv && conv.settings) };", "    return { ...state.settings };"),),
             ("test_settings_differ_per_chat_and_new_chats_take_the_defaults",), target="chat.js"),
    # Issue 23 item 5: tool-call arguments stream as the model writes them.
    Mutation("tool-arguments-held-to-close", "a streamed tool call's arguments are held until the call closes",
             (("            self.scanner.live = True   # a stream: arguments go out as they come\n",
               "            self.scanner.live = False\n"),),
             ("test_tool_arguments_stream_as_the_model_writes_them", "test_sdks_stream_tool_arguments_incrementally")),
    Mutation("streamed-arguments-reencoded", "a streamed call ends with its arguments re-encoded, not the text streamed",
             (('            function = {**call["function"], "arguments": sent["raw"]} if same else call["function"]\n',
               '            function = call["function"]\n'),),
             ("test_tool_arguments_stream_as_the_model_writes_them", "test_sdks_stream_tool_arguments_incrementally")),
    Mutation("call-tail-streamed-as-arguments", "a call's arguments stream past their closing brace (the call's tail)",
             (('                self.streamed[-1]["done"] = self.depth == 0\n',
               '                self.streamed[-1]["done"] = False\n'),),
             ("test_tool_arguments_stream_as_the_model_writes_them",
              "test_family_markers_split_anywhere_never_reach_content")),
    Mutation("parallel-calls-not-limited", "parallel_tool_calls false lets every tool call through",
             (('"one_call": body.get("parallel_tool_calls") is False}', '"one_call": False}'),),
             ("test_one_tool_call_when_parallel_calls_are_off",)),
    Mutation("disable-parallel-tool-use-ignored", "Anthropic's disable_parallel_tool_use is not read",
             (('choice.get("disable_parallel_tool_use") is True', 'choice.get("disable_parallel") is True'),),
             ("test_one_tool_call_when_parallel_calls_are_off",)),
    Mutation("thinking-budget-ignored", "thinking.budget_tokens never closes the reasoning",
             (('    if request.thinking_budget and getattr(model.tokenizer, "has_thinking", False):',
               '    if False:'),),
             ("test_thinking_budget_closes_the_reasoning",)),
    Mutation("escape-does-not-stop", "Escape leaves the reply streaming",
             (("      stopGenerating(conv);\n    }\n  }\n", "    }\n  }\n"),),
             ("test_two_tabs_on_one_chat_keep_both_replies_and_escape_stops",), target="chat.js"),
    # The chat page's two flaky tests (branch page): a new turn from another tab, a reload before a write.
    Mutation("tabs-new-turn-unsynced", "a turn taken in from another tab counts as changed by this tab: its next "
                                       "write bumps it, and the other tab's later change of it (a Stop, an edit) is lost",
             (("    for (const m of order) if (!mine.has(m.id)) result.taken.add(m.id); // new from another tab: stored as it is\n",
               ""),),
             ("test_a_turn_another_tab_added_stays_that_tabs_to_edit",), target="chat.js"),
    Mutation("reload-drops-unwritten", "a reload before the page wrote a finished reply loses it "
                                       "(the page leaves nothing but an IndexedDB write that never finishes)",
             (("      keepUnsaved();\n      if (store.dirty.size) flush();", "      if (store.dirty.size) flush();"),),
             ("test_a_reply_not_yet_written_when_the_page_reloads_is_kept",), target="chat.js"),
    Mutation("unsaved-skips-writes-in-flight", "a page leaving while a write of a chat is under way keeps nothing "
                                               "of it: an edit saved just before leaving is lost",
             (("    for (const id of new Set([...store.dirty, ...store.inFlight, ...store.failed.keys()])) {",
               "    for (const id of new Set([...store.dirty, ...store.failed.keys()])) {"),),
             ("test_a_turn_another_tab_added_stays_that_tabs_to_edit",), target="chat.js"),
    # Assistant prefill (issue 25's Continue, in the server).
    Mutation("prefill-keeps-end-of-turn", "a continued assistant message is rendered whole, its end of turn included",
             (("            return tokenizer.encode(text[:text.index(PREFILL_MARK)], add_special_tokens=False)",
               "            return tokenizer.encode(text.replace(PREFILL_MARK, \"\"), add_special_tokens=False)"),),
             ("test_messages_prefill_continues_the_assistant_text",
              "test_chat_prefill_continues_the_last_assistant_message",
              "test_responses_prefill_continues_the_last_assistant_message")),
    Mutation("chat-prefill-ignored", "a chat request ending in an assistant message gets a new reply after it",
             (("    return continuable and wanted is not False and not fresh", "    return False"),),
             ("test_chat_prefill_continues_the_last_assistant_message",)),
    Mutation("responses-prefill-ignored", "Responses input ending in an assistant message gets a new reply after it",
             (("        prefill=last.get(\"role\") == \"assistant\" and not last.get(\"tool_calls\"),", ""),),
             ("test_responses_prefill_continues_the_last_assistant_message",)),
    Mutation("prefill-whitespace-accepted", "an Anthropic prefill ending in whitespace is continued, not refused",
             (("    if last[\"content\"] != last[\"content\"].rstrip():", "    if False:"),),
             ("test_messages_prefill_refused_where_anthropic_refuses_it", "test_bad_messages_bodies_are_anthropic_400s")),
    Mutation("prefill-thinking-accepted", "an Anthropic prefill with thinking on is continued, not refused",
             (("    if ((body.get(\"thinking\") or {}).get(\"type\")) in THINKING_ON:", "    if False:"),),
             ("test_messages_prefill_refused_where_anthropic_refuses_it",)),
    Mutation("prefill-mark-unchecked", "a template that drops the assistant text gets a generic template error",
             (("        if text.count(PREFILL_MARK) == 1:", "        if True:"),),
             ("test_prefill_refused_where_the_template_drops_the_assistant_text",)),
    Mutation("prefill-thinking-tail-only", "a prefill cut while thinking is read as an answer when its reasoning "
                                           "began before the prompt's last REASONING_PROMPT_TAIL tokens",
             (("    tail = 0 if prefill else max(", "    tail = max("),),
             ("test_prefill_of_a_reply_cut_while_thinking_goes_on_thinking",)),
    Mutation("prefill-reasoning-answered", "a reply with only reasoning is continued after its reasoning (an answer)",
             (('    fields = ("reasoning_content", "content") if', '    fields = ("content",) if'),),
             ("test_prefill_of_a_reply_cut_while_thinking_goes_on_thinking",)),
    Mutation("schema-bound-overflow", "a bound beyond a float's range reaches math.isfinite: an OverflowError, a 500",
             (("                                             abs(v) <= sys.float_info.max)),",
               "                                             math.isfinite(v))),"),),
             ("test_unenforceable_schemas_are_400_naming_the_keyword",)),
    Mutation("refusal-before-headers-crashes", "http.server's 431 on a /v1/models path reads headers not yet parsed: "
                                               "the connection drops with no reply",
             (('            return headers is not None and headers.get("anthropic-version") is not None',
               '            return self.headers.get("anthropic-version") is not None'),),
             ("test_request_line_and_headers_too_long_are_414_and_431_and_other_versions_505",)),
    # Issue 21, item 7: rank 0 shares the next step before this step's text only when nothing can change the batch.
    Mutation("send-ahead-despite-stop-strings", "rank 0 shares the next step ahead while a sequence can still meet "
                                                "a stop string: its Remove then runs on rank 0 a step before the "
                                                "other ranks, and the group's batches part",
             (("        if any(s.job.request.stop or s.job.should_stop() for s in self.running.values()):",
               "        if any(s.job.should_stop() for s in self.running.values()):"),),
             ("test_sharded_group_serves_on_rank_0_and_answers_like_one_process",)),
]


def copy_repository(dest: Path) -> None:
    """The files the tests need, without the real lem_serve.py's neighbours that could change under us."""
    shutil.copytree(ROOT, dest, ignore=COPY_IGNORE)


def apply(mutation: Mutation, source: str) -> str:
    """The source with the mutation's edits made; ValueError when a piece is not found exactly once."""
    for old, new in mutation.edits:
        count = source.count(old)
        if count != 1:
            raise ValueError(f"{old.strip()[:60]!r} occurs {count} times in {mutation.target}")
        source = source.replace(old, new)
    return source


def test_file_of(folder: Path, test: str) -> str:
    """The test file (relative to folder) that defines `test` (a name, maybe with [params]):
    test_lem_serve.py, or one of testing/test_*.py once the tests are split by surface."""
    name = test.split("[")[0]
    for path in [folder / "test_lem_serve.py", *sorted((folder / "testing").glob("test_*.py"))]:
        if f"def {name}(" in path.read_text(encoding="utf-8"):
            return path.relative_to(folder).as_posix()
    return "test_lem_serve.py"


def run_tests(folder: Path, tests: tuple[str, ...]) -> tuple[int, str]:
    """Run the named tests in `folder`; return pytest's exit code and the first failing test, if any."""
    command = [sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider",
               *(f"{test_file_of(folder, t)}::{t}" for t in tests)]
    try:
        out = subprocess.run(command, cwd=folder, capture_output=True, text=True, timeout=RUN_TIMEOUT)
    except subprocess.TimeoutExpired:
        return -1, f"timed out after {RUN_TIMEOUT} s"
    failed = next((line[len("FAILED "):].split(" - ")[0] for line in out.stdout.splitlines()
                   if line.startswith("FAILED ")), "")
    return out.returncode, failed.split("::", 1)[-1] or out.stdout.strip().splitlines()[-1:][0]


def run_mutation(mutation: Mutation) -> tuple[str, str]:
    """(result, detail): caught, missed or error, for one mutation on a fresh copy."""
    pristine = (ROOT / mutation.target).read_text(encoding="utf-8")
    try:
        mutated = apply(mutation, pristine)
    except ValueError as exc:
        return "error", str(exc)
    with tempfile.TemporaryDirectory(prefix="lem-mutant-") as tmp:
        folder = Path(tmp) / "repo"
        copy_repository(folder)
        (folder / mutation.target).write_text(mutated, encoding="utf-8")
        code, detail = run_tests(folder, mutation.tests)
    if code == 1:
        return "caught", detail
    return ("missed", "the tests passed") if code == 0 else ("error", f"pytest exit {code}: {detail}")


def main(argv: list[str] | None = None) -> int:
    """Run the chosen mutations and print a Markdown table of what caught each."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("names", nargs="*", help="mutations to run (default: all)")
    parser.add_argument("--list", action="store_true", help="list the mutations and exit")
    args = parser.parse_args(argv)
    by_name = {m.name: m for m in MUTATIONS}
    if args.list:
        for m in MUTATIONS:
            print(f"{m.name:34} {m.bug}")
        return 0
    unknown = [n for n in args.names if n not in by_name]
    if unknown:
        parser.error(f"unknown mutation(s): {', '.join(unknown)}")
    chosen = [by_name[n] for n in args.names] or MUTATIONS

    tests = tuple(dict.fromkeys(t for m in chosen for t in m.tests))
    with tempfile.TemporaryDirectory(prefix="lem-pristine-") as tmp:
        copy_repository(Path(tmp) / "repo")
        code, detail = run_tests(Path(tmp) / "repo", tests)
    if code != 0:
        print(f"the named tests fail on the unchanged code ({detail}); fix that first", file=sys.stderr)
        return 2

    rows, started = [], time.monotonic()
    for mutation in chosen:
        result, detail = run_mutation(mutation)
        rows.append((mutation, result, detail))
        print(f"{result:7} {mutation.name}: {detail}", file=sys.stderr, flush=True)
    print("| mutation | planted bug | result | failing test |\n|---|---|---|---|")
    for mutation, result, detail in rows:
        print(f"| `{mutation.name}` | {mutation.bug} | **{result}** | {detail} |")
    caught = sum(result == "caught" for _, result, _ in rows)
    print(f"\n{caught} of {len(rows)} caught in {time.monotonic() - started:.0f} s.")
    return 0 if caught == len(rows) else 1


if __name__ == "__main__":
    sys.exit(main())
