"""``python -m app serve``: run the HTTP server with the settings from the environment."""

from __future__ import annotations

import argparse
import logging

import uvicorn

from app.main import create_app
from app.settings import Settings


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m app")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("serve", help="serve every model under IMAGEGEN_MODELS_DIR")
    args = parser.parse_args(argv)
    if args.command == "serve":
        settings = Settings()
        logging.basicConfig(level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
        uvicorn.run(create_app(settings), host=settings.host, port=settings.port, log_level=settings.log_level)


if __name__ == "__main__":
    main()
