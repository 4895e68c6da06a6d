"""``python -m app serve``: run the HTTP server with the settings from the environment."""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

import uvicorn

from app.main import create_app
from app.settings import Settings


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m app")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("serve", help="serve every model under IMAGEGEN_MODELS_DIR")
    check = sub.add_parser("verify", help="report the C2PA state, XMP label and watermark of image files")
    check.add_argument("files", nargs="+", type=Path)
    args = parser.parse_args(argv)
    if args.command == "verify":
        from app.gate.verify import verify

        for path in args.files:
            print(json.dumps({"file": str(path), **verify(path.read_bytes())}, indent=2))
        return
    if args.command == "serve":
        settings = Settings()
        logging.basicConfig(level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
        uvicorn.run(create_app(settings), host=settings.host, port=settings.port, log_level=settings.log_level)


if __name__ == "__main__":
    main()
