"""The web demo: grounded captions, phrase grounding, referring to a drawn region, grounded VQA.

    python -m kosmos2_jax.serve --checkpoint ckpt/kosmos2 --tokenizer sentencepiece.bpe.model
    make serve        # after `make demo`: the demo's trained model, at http://127.0.0.1:7860

Loads the checkpoint, compiles the programs the page's defaults need for every `--batch_sizes`
entry (so the first visitor does not wait for XLA), then serves the page and its API
(`gradio_client`: endpoints /describe, /ground, /refer, /ask). Needs the `serve` extra
(`pip install -e ".[serve]"`).
"""

from __future__ import annotations

import os
import sys

from kosmos2_jax.utils.errors import UsageError

# the released demo's images, beside the repository (never copied into it)
DEFAULT_EXAMPLES = os.path.join(os.environ.get("KOSMOS2_SHARED_DIR") or os.path.join(
    os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "..", "shared", "kosmos2"), "images")


def parse_args(argv):
    from kosmos2_jax.utils import cli

    p = cli.ArgumentParser(prog="python -m kosmos2_jax.serve", description=__doc__.split("\n")[0])
    p.add_argument("--checkpoint", required=True, type=cli.existing_dir, help="our checkpoint folder or a HF folder")
    p.add_argument("--tokenizer", required=True, type=cli.existing_file, help="sentencepiece model")
    p.add_argument("--host", default="127.0.0.1", help="0.0.0.0 to serve other machines")
    p.add_argument("--port", type=cli.integer(1, 65535), default=7860)
    p.add_argument("--batch_sizes", default="1,8",
                   help="comma-separated: a batch of concurrent requests is padded to the next of these; "
                        "the largest is the most requests one generate call answers")
    p.add_argument("--prompt", action="append", dest="prompts",
                   help="a Describe prompt to offer (repeatable; default: the released model's brief and "
                        "detailed prompts, '<grounding>An image of' and '<grounding>Describe this image in detail:')")
    p.add_argument("--examples", default=DEFAULT_EXAMPLES,
                   help="a folder of example images shown under each tab (skipped when absent)")
    p.add_argument("--max_file_size", default="50mb", help="the largest upload accepted")
    p.add_argument("--no_warm_up", action="store_true", help="compile on first use instead of at start-up")
    cli.add_decode_mode_flags(p)
    cli.add_mesh_flag(p)
    cli.add_compilation_cache_flags(p)
    args = p.parse_args(argv)
    try:
        args.batch_sizes = tuple(sorted({int(b) for b in args.batch_sizes.split(",") if b.strip()}))
    except ValueError:
        p.error(f"argument --batch_sizes: {args.batch_sizes!r} is not a comma-separated list of integers")
    if not args.batch_sizes or args.batch_sizes[0] < 1:
        p.error(f"argument --batch_sizes: needs integers >= 1, got {args.batch_sizes}")
    return args


def main(argv=None) -> int:
    from kosmos2_jax.utils import cli

    args = parse_args(argv)
    cli.apply_compilation_cache_flags(args)
    return cli.run(lambda: serve(args))


def check_port(host: str, port: int) -> None:
    """A UsageError when `host:port` cannot be listened on (in use, or not this machine's address)."""
    import socket

    try:
        with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the server itself binds
            s.bind((host, port))
    except OSError as e:
        raise UsageError(f"--port {port}: cannot listen on {host}:{port} ({e.strerror}): "
                         "another server has it? pick another --port") from None


def serve(args, block: bool = True):
    import warnings

    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # no telemetry or version checks
    # Gradio's own use of a name Starlette renamed: a warning per refused request, nothing to act on
    warnings.filterwarnings("ignore", message=".*HTTP_422_UNPROCESSABLE_ENTITY.*")
    try:
        import gradio  # noqa: F401
    except ImportError:
        raise UsageError('the web demo needs gradio: pip install -e ".[serve]"') from None
    from kosmos2_jax.serving import service as serving
    from kosmos2_jax.models import sharding
    from kosmos2_jax.serving import webapp

    check_port(args.host, args.port)  # before minutes of loading and compiling
    mesh = sharding.local_mesh(args.mesh)
    prompts = args.prompts or list(serving.DESCRIBE_PROMPTS.values())
    service = serving.Service.load(args.checkpoint, args.tokenizer, args.batch_sizes, decode_mode=args.decode_mode,
                                   tokens_per_call=args.tokens_per_call, mesh=mesh)
    print(f"loaded {service.name}: {service.grid}x{service.grid} location grid, batches of "
          f"{', '.join(map(str, service.batch_sizes))}", flush=True)
    if not args.no_warm_up:
        n = service.warm_up(webapp.warm_up_requests(prompts), progress=lambda m: print(m, flush=True))
        print(f"compiled {n} programs", flush=True)
    examples = webapp.example_images(args.examples)
    app = webapp.build_app(service, examples, prompts)
    print(f"serving at http://{args.host}:{args.port}", flush=True)
    return webapp.launch(app, args.host, args.port, args.max_file_size, block=block)


if __name__ == "__main__":
    sys.exit(main())
