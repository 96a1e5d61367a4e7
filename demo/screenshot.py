"""Screenshot of the demo page and the latency of one query through the browser (submit -> results shown).

    python demo/screenshot.py --out docs/demo.png --queries 20   # the main job's model over the shapes test gallery
    python demo/screenshot.py --out page.png -- --model DIR --gallery FOLDER   # after --: demo/app.py's arguments

Starts `demo/app.py` on a free loopback port, opens it in headless Chromium (the system's, see demo/browser.py), runs
one untimed warm-up query, then `--queries` queries one after the other (the example queries of the shapes test split
in turn, or the gallery's first images with `--text` when there are no examples) and prints the median, min and max
seconds from the click on Search to the page showing all result images, loaded (the reference upload and the typing
come before the click and are not counted, nor is the attention picture, which follows the results). It also prints
the median retrieval time the page reports (query embedding + search, measured in the server) and the machine's load
average: on a shared machine the figure depends on it. Then it clicks the first example (or uploads the first image),
searches and saves a full-page screenshot to `--out`. The server and the browser are stopped at the end whatever
happens.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import re
import statistics
import sys
import tempfile
from pathlib import Path


DEMO_DIR = Path(__file__).resolve().parent


def _module(name: str):
    spec = importlib.util.spec_from_file_location(f"mqirtn_demo_{name}", DEMO_DIR / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    app_args = argv[argv.index("--") + 1 :] if "--" in argv else []
    own = argv[: argv.index("--")] if "--" in argv else argv
    parser = argparse.ArgumentParser(prog="demo/screenshot.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="docs/demo.png", help="screenshot PNG (default docs/demo.png)")
    parser.add_argument("--queries", type=int, default=20, help="queries timed through the browser (default 20)")
    parser.add_argument("--top-k", type=int, default=10, help="results per query (default 10)")
    parser.add_argument(
        "--text",
        default="make the object in the middle red",
        help="modification text when the gallery has no example queries",
    )
    parser.add_argument("--json", help="also write the timings here as JSON")
    args = parser.parse_args(own)

    browser, app = _module("browser"), _module("app")
    from playwright.sync_api import sync_playwright

    app_parsed = app.build_parser().parse_args(app_args)
    if app_parsed.model is None and not app.DEFAULT_MODEL.is_dir():
        parser.error(f"{app.DEFAULT_MODEL} is not there: run bash scripts/main.sh first, or pass -- --model DIR")
    # The queries: the app's own example queries (the shapes test split) unless a gallery is given.
    if app_parsed.gallery is None:
        cache = Path(app_parsed.cache_dir) if app_parsed.cache_dir else app.default_cache_dir()
        config = json.loads((Path(app_parsed.model or app.DEFAULT_MODEL) / "config.json").read_text())
        _, examples = app.shapes_test_gallery(cache, int(config["vision_config"].get("image_size", 48)))
        queries = [(path, text) for path, text, _ in examples]
    else:
        from mqirtn_app.index import image_files

        queries = [(str(path), args.text) for path in image_files(app_parsed.gallery)[:10]]
    if not queries:
        parser.error("no queries: the gallery has no images")

    log = Path(tempfile.mkdtemp(prefix="mqirtn-demo-")) / "server.log"
    server = browser.DemoServer(app_args, log, timeout=600)
    timings, retrieval_ms = [], []
    load_before = os.getloadavg()[0]
    with server, sync_playwright() as playwright:
        chromium = browser.launch_browser(playwright)
        try:
            page = browser.open_page(chromium, server.url)
            browser.set_query(page, queries[-1][0], queries[-1][1], args.top_k)
            browser.submit(page, expected=args.top_k)  # warm-up, not timed
            for number in range(args.queries):
                image, text = queries[number % len(queries)]
                browser.set_query(page, image, text, args.top_k)
                timings.append(browser.submit(page, expected=args.top_k))
                browser.wait_for_attention(page)  # not timed: it follows the results
                status = browser.status_text(page)
                if "Error" in status:
                    raise RuntimeError(f"query {number} failed on the page: {status}")
                retrieval_ms.append(float(re.search(r"in (\d+) ms", status).group(1)))
            if app_parsed.gallery is None:
                page.get_by_text(examples[0][1], exact=False).first.click()  # an example, as a visitor would
                page.locator("#query-text textarea").wait_for()
                browser.set_query(page, None, examples[0][1], args.top_k)
            else:
                browser.set_query(page, queries[0][0], queries[0][1], args.top_k)
            browser.submit(page, expected=args.top_k)
            browser.wait_for_attention(page)
            page.mouse.move(0, 0)
            page.wait_for_timeout(1000)  # the new pictures fade in
            Path(args.out).parent.mkdir(parents=True, exist_ok=True)
            page.screenshot(path=args.out, full_page=True)
        finally:
            chromium.close()
    median = statistics.median(timings)
    load = (load_before + os.getloadavg()[0]) / 2
    print(
        f"{len(timings)} queries through the browser (submit -> {args.top_k} results shown): median {median:.3f} s, "
        f"min {min(timings):.3f} s, max {max(timings):.3f} s; of which retrieval (query embedding + search, the "
        f"page's status line): median {statistics.median(retrieval_ms):.0f} ms; {os.cpu_count()} CPUs, load average "
        f"{load:.1f}"
    )
    print(f"Wrote the screenshot to {args.out}")
    if args.json:
        Path(args.json).write_text(
            json.dumps(
                {
                    "seconds": timings,
                    "median": median,
                    "retrieval_ms": retrieval_ms,
                    "median_retrieval_ms": statistics.median(retrieval_ms),
                    "top_k": args.top_k,
                    "app_args": app_args,
                    "cpus": os.cpu_count(),
                    "load_average": load,
                },
                indent=1,
            )
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
