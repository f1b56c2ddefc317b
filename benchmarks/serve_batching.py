"""The web demo's request batching, measured through its API as a client sees it.

    python benchmarks/serve_batching.py --checkpoint workdir/shapes_tiny/export \\
        --tokenizer workdir/demo_data/spm/shapes.model --prompt "<grounding>" --images workdir/demo_data/examples

Starts `python -m kosmos2_jax.serve` on a free port, sends N images one at a time (each request's
time and answer), then the same N at once, three times; prints both times, their ratio, the batch sizes the
server reported, and whether every concurrent answer equals its single-request answer.
`--screenshot FILE` also saves the page after a Describe of the first image (headless Chromium).
"""

from __future__ import annotations

import argparse
import os
import queue
import socket
import statistics
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

DECODING = ("greedy", 128, 3, 3, 1.0, 0.9, 0)  # the page's defaults: strategy ... seed


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(argv: list[str], timeout: float = 300, env: dict | None = None, log=None):
    """`python -m kosmos2_jax.serve ARGV --port P` in a subprocess; returns (process, url) once it
    serves. Its output goes to `log` (a file) as it comes."""
    port = free_port()
    log = log or open(os.devnull, "w")
    proc = subprocess.Popen([sys.executable, "-u", "-m", "kosmos2_jax.serve", *argv, "--port", str(port)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    lines: queue.Queue = queue.Queue()

    def copy():  # for the process' whole life: it must never block on a full pipe
        for line in proc.stdout:
            log.write(line)
            log.flush()
            lines.put(line)
        lines.put(None)

    threading.Thread(target=copy, daemon=True).start()
    deadline, seen = time.monotonic() + timeout, []
    while True:
        try:
            line = lines.get(timeout=max(0.0, deadline - time.monotonic()))
        except queue.Empty:
            line = None
        if line is None:
            proc.kill()
            raise RuntimeError("the server did not start:\n" + "".join(seen[-30:]))
        seen.append(line)
        if line.startswith("* Running on local URL"):
            return proc, f"http://127.0.0.1:{port}/"


def describe(client, image: str, prompt: str):
    from gradio_client import handle_file

    start = time.perf_counter()
    _, _, record, status = client.predict(handle_file(image), prompt, *DECODING, api_name="/describe")
    return record, status, time.perf_counter() - start


def measure(url: str, images: list[str], prompt: str, repeats: int = 3) -> dict:
    """Each image alone, then all at once (`repeats` times: the fastest counts, as a shared
    machine's noise only ever adds time): times, batch sizes, answers equal."""
    from gradio_client import Client

    client = Client(url, verbose=False)
    describe(client, images[0], prompt)  # the first request pays for the connection
    singles = [describe(client, image, prompt) for image in images]
    one = statistics.median(t for _, _, t in singles)
    runs = []
    for _ in range(repeats):
        start = time.perf_counter()
        with ThreadPoolExecutor(len(images)) as pool:
            together = list(pool.map(lambda image: describe(client, image, prompt), images))
        runs.append((time.perf_counter() - start, together))
    same = all(a[0]["text"] == b[0]["text"] and a[0]["entities"] == b[0]["entities"]
               for _, together in runs for a, b in zip(singles, together))
    total, together = min(runs, key=lambda run: run[0])
    return {"one_request_s": one, "concurrent_s": total, "n": len(images), "ratio": total / one,
            "all_concurrent_s": [round(t, 3) for t, _ in runs],
            "batches": sorted({r["batch"] for _, together in runs for r, _, _ in together}), "same_answers": same,
            "singles": singles, "together": together}


def screenshot(url: str, image: str, path: str, prompt: str | None = None) -> None:
    """The page after a Describe of `image` (Debian's chromium through Playwright)."""
    import shutil

    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=shutil.which("chromium") or shutil.which("chromium-browser"),
                                    args=["--no-sandbox"])
        page = browser.new_page(viewport={"width": 1280, "height": 900})
        page.goto(url)
        page.locator("#describe-image input[type=file]").set_input_files(image)
        page.wait_for_selector("#describe-image img")
        page.click("#describe-button")
        page.wait_for_selector("#describe-status :text('s for a batch')", timeout=60_000)
        # the outputs' loading overlays fade out after the answer arrives: a screenshot before that
        # shows the page greyed
        page.wait_for_function("() => [...document.querySelectorAll('.wrap.full')]"
                               ".every(e => getComputedStyle(e).opacity === '0')", timeout=10_000)
        page.screenshot(path=path)
        browser.close()


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--tokenizer", required=True)
    p.add_argument("--images", required=True, help="a folder: its first --num images are the requests")
    p.add_argument("--num", type=int, default=8)
    p.add_argument("--prompt", default="<grounding>An image of")
    p.add_argument("--batch_sizes", default="1,8")
    p.add_argument("--screenshot", help="save the page after a Describe of the first image here")
    args = p.parse_args(argv)
    names = sorted(n for n in os.listdir(args.images) if n.lower().endswith((".png", ".jpg", ".jpeg")))
    images = [os.path.join(args.images, n) for n in names[:args.num]]
    if len(images) < args.num:
        p.error(f"--images {args.images}: {len(images)} images, --num {args.num}")
    proc, url = start_server(["--checkpoint", args.checkpoint, "--tokenizer", args.tokenizer, "--prompt", args.prompt,
                              "--batch_sizes", args.batch_sizes, "--examples", args.images], log=sys.stdout)
    try:
        result = measure(url, images, args.prompt)
        print(f"one request {result['one_request_s']:.3f} s (median of {result['n']}); {result['n']} at once "
              f"{result['concurrent_s']:.3f} s (fastest of {result['all_concurrent_s']}) = {result['ratio']:.2f}x one; "
              f"server batches {result['batches']}; "
              f"answers equal to single requests: {result['same_answers']}")
        if args.screenshot:
            screenshot(url, images[0], args.screenshot)
            print(f"wrote {args.screenshot}")
    finally:
        proc.terminate()
        proc.wait(30)
    return 0


if __name__ == "__main__":
    sys.exit(main())
