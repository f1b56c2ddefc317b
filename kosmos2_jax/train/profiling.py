"""Where a compiled step spends its time: an XLA profile summed by model part and kind of op.

`trace(fn, steps, logdir)` runs `fn` under `jax.profiler.trace` (the trace opens in TensorBoard's
profile plugin or Perfetto) and `summarize(logdir, hlo_text, steps)` reads it back with
`jax.profiler.ProfileData`, with no TensorFlow needed: the time of every XLA op of the program
whose optimized HLO is `hlo_text` (`compiled.as_text()`), attributed to

- a part, by the op's `op_name` metadata (its JAX name stack): the vision tower, the resampler, the
  decoder, the LM head and loss (`jax.named_scope("lm_head")` in trainer.py), the optimizer update
  (`jax.named_scope("optimizer")`), or other (embedding gathers, parameter copies, ...);
- a kind: attention (ops under an attention scope, and cuDNN's fused attention), matmul (dots,
  convolutions and fusions or library calls that hold one), collective (all-reduce, all-gather, ...)
  or other (elementwise, normalization, copies, reductions).

On accelerators the ops come from the device's "XLA Ops" timeline; on CPU from the host threads'
op events, which can overlap (XLA:CPU runs independent ops concurrently), so their sum can exceed
the wall-clock step. Control flow (while, conditional, call) is left out: the ops inside it are
counted themselves.
"""

from __future__ import annotations

import collections
import glob
import os
import re

PARTS = (("optimizer", "optimizer"), ("lm_head", "LM head + loss"), ("vision_model", "vision tower"),
         ("image_to_text_projection", "resampler"), ("text_model", "decoder"))
# name stacks that lose their prefix inside rematted scan bodies
PREFIXES = (("encoder/", "vision tower"), ("layers/", "decoder"))
KINDS = ("matmul", "attention", "collective", "other")
CONTAINERS = {"while", "conditional", "call"}
COLLECTIVES = ("all-reduce", "all-gather", "reduce-scatter", "all-to-all", "collective-permute")

_HEADER = re.compile(r"^(?:ENTRY\s+)?%?([\w.\-]+)\s.*\{\s*$")
_INSTRUCTION = re.compile(r"^\s*(?:ROOT\s+)?%?([\w.\-]+) = (.*)$")


def _opcode(rhs: str) -> str:
    """The opcode in an instruction's right-hand side: `TYPE opcode(operands), attributes`."""
    i = 0
    if rhs.startswith("("):  # a tuple type: skip to its closing parenthesis
        depth = 0
        for i, ch in enumerate(rhs):
            depth += (ch == "(") - (ch == ")")
            if depth == 0:
                break
    rest = rhs[i:].split(" ", 1)[1] if " " in rhs[i:] else ""
    return rest.split("(", 1)[0].strip()


def parse_hlo(hlo_text: str) -> dict:
    """{instruction name: (opcode, op_name, custom-call target, opcodes of the computations it calls)}
    for every instruction of an optimized HLO module. An instruction XLA made without metadata (a
    layout conversion wrapped in a fusion) takes the op_name of the last instruction that has one in
    a computation it calls."""
    ops, body, names, computation = {}, collections.defaultdict(set), collections.defaultdict(list), None
    for line in hlo_text.splitlines():
        if not line.startswith(" "):
            header = _HEADER.match(line)
            computation = header.group(1) if header else None
            continue
        m = _INSTRUCTION.match(line)
        if not m or computation is None:
            continue
        name, rhs = m.groups()
        opcode = _opcode(rhs)
        body[computation].add(opcode)
        op_name = re.search(r'op_name="([^"]*)"', rhs)
        target = re.search(r'custom_call_target="([^"]*)"', rhs)
        calls = re.findall(r"(?:calls|to_apply|body|condition)=%?([\w.\-]+)", rhs)
        if op_name:
            names[computation].append(op_name.group(1))
        ops[name] = (opcode, op_name.group(1) if op_name else "", target.group(1) if target else "", calls)

    def inherited(calls):
        return next((n for c in calls for n in reversed(names[c])), "")

    return {name: (opcode, op_name or inherited(calls), target, set().union(*(body[c] for c in calls)))
            for name, (opcode, op_name, target, calls) in ops.items()}


def part_of(op_name: str) -> str:
    for key, part in PARTS:
        if key in op_name:
            return part
    for prefix, part in PREFIXES:
        if op_name.startswith(prefix):
            return part
    return "other"


def kind_of(opcode: str, op_name: str, target: str, called_opcodes: set) -> str:
    if "fmha" in target.lower() or "attention" in op_name:
        return "attention"
    if opcode.startswith(COLLECTIVES) or any(c.startswith(COLLECTIVES) for c in called_opcodes):
        return "collective"
    if (opcode in ("dot", "convolution") or called_opcodes & {"dot", "convolution"}
            or any(k in target.lower() for k in ("gemm", "matmul"))):
        return "matmul"
    return "other"


def trace(fn, steps: int, logdir: str):
    """Runs `fn()` `steps` times under the profiler (blocking on each result); returns the last."""
    import jax

    with jax.profiler.trace(logdir):
        for i in range(steps):
            with jax.profiler.StepTraceAnnotation("train", step_num=i):
                out = jax.block_until_ready(fn())
    return out


def op_events(logdir: str) -> list[tuple[str, str, float]]:
    """(module, op, seconds) of every XLA op event in the newest trace under `logdir`."""
    from jax.profiler import ProfileData

    files = sorted(glob.glob(os.path.join(logdir, "**", "*.xplane.pb"), recursive=True), key=os.path.getmtime)
    if not files:
        raise FileNotFoundError(f"no *.xplane.pb profile under {logdir}")
    profile = ProfileData.from_file(files[-1])
    # accelerators: the derived "XLA Ops" timeline (one event per op), else kernels tagged with
    # their op; the CPU: host threads' events tagged with their op
    xla_ops, kernels, host = [], [], []
    for plane in profile.planes:
        on_device = plane.name.startswith("/device:") and not plane.name.startswith("/device:CPU")
        for line in plane.lines:
            for event in line.events:
                stats = dict(event.stats)
                row = (str(stats.get("hlo_module", "")), str(stats.get("hlo_op", event.name)), event.duration_ns * 1e-9)
                if on_device and line.name == "XLA Ops":
                    xla_ops.append(row)
                elif "hlo_op" in stats:
                    (kernels if on_device else host).append(row)
    return xla_ops or kernels or host


def summarize(logdir: str, hlo_text: str, steps: int) -> dict:
    """Per-step seconds by (part, kind), the top ops, and what could not be attributed."""
    ops = parse_hlo(hlo_text)
    module = re.match(r"HloModule\s+([\w.\-]+)", hlo_text)
    module = module.group(1) if module else ""
    table = collections.defaultdict(float)
    by_op = collections.defaultdict(float)
    unknown = 0.0
    for event_module, op, seconds in op_events(logdir):
        if module and event_module and not event_module.startswith(module):
            continue  # another program (an input transfer, a metric's jit)
        if op not in ops:
            unknown += seconds / steps
            continue
        opcode, op_name, target, called = ops[op]
        if opcode in CONTAINERS:
            continue
        table[part_of(op_name), kind_of(opcode, op_name, target, called)] += seconds / steps
        by_op[op] += seconds / steps
    top = sorted(by_op.items(), key=lambda kv: -kv[1])
    return {"table": dict(table), "top": [(op, s, ops[op][0], ops[op][1]) for op, s in top],
            "unattributed": unknown}


def format_summary(summary: dict, step_seconds: float | None = None, top: int = 12) -> str:
    """Markdown tables: seconds per step by part and kind, then the `top` slowest ops."""
    table = summary["table"]
    parts = sorted({p for p, _ in table}, key=lambda p: -sum(v for (q, _), v in table.items() if q == p))
    total = sum(table.values())
    if not total:
        return (f"no op of the program in the trace ({summary['unattributed']:.3g} s per step in ops not in its HLO): "
                "open the trace in TensorBoard or Perfetto")
    head = f"op time per step {total:.4g} s"
    if step_seconds:
        head += f" (wall-clock step {step_seconds:.4g} s)"
    if summary["unattributed"]:
        head += f"; {summary['unattributed']:.3g} s in ops not in the program's HLO"
    lines = [head, "", "| part | " + " | ".join(KINDS) + " | total | share |", "|---" * (len(KINDS) + 3) + "|"]
    for p in parts:
        row = [table.get((p, k), 0.0) for k in KINDS]
        lines.append(f"| {p} | " + " | ".join(f"{v * 1e3:.1f} ms" for v in row)
                     + f" | {sum(row) * 1e3:.1f} ms | {100 * sum(row) / total:.1f}% |")
    column = [sum(table.get((p, k), 0.0) for p in parts) for k in KINDS]
    lines.append("| all | " + " | ".join(f"{v * 1e3:.1f} ms" for v in column) + f" | {total * 1e3:.1f} ms | 100% |")
    lines += ["", "| op | per step | opcode | op_name |", "|---|---|---|---|"]
    for op, seconds, opcode, op_name in summary["top"][:top]:
        lines.append(f"| {op} | {seconds * 1e3:.2f} ms | {opcode} | {op_name[-110:]} |")
    return "\n".join(lines)
