"""``imagegen`` (or ``python -m imagegen``): serve, probe a running server, make an API key, or verify image files."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from imagegen.settings import Settings


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="imagegen")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("serve", help="serve every model under IMAGEGEN_MODELS_DIR")
    sub.add_parser("probe", help="exit 0 when /healthz of the configured server answers (container HEALTHCHECK)")
    key = sub.add_parser("new-key", help="print a new API key and its entry for IMAGEGEN_API_KEYS_FILE")
    key.add_argument("--name", required=True)
    key.add_argument("--role", action="append", choices=["generate", "review", "admin"], required=True)
    key.add_argument("--requests-per-minute", type=float, default=60)
    key.add_argument("--max-concurrent", type=int, default=4)
    check = sub.add_parser("verify", help="report the C2PA state, XMP label and watermark of image files")
    check.add_argument("files", nargs="+", type=Path)
    args = parser.parse_args(argv)
    if args.command == "verify":
        from imagegen.gate.verify import verify
        from imagegen.uploads import UploadError

        failed = False
        for path in args.files:
            try:
                print(json.dumps({"file": str(path), **verify(path.read_bytes())}, indent=2))
            except (UploadError, OSError) as exc:
                print(f"{path}: {exc}", file=sys.stderr)
                failed = True
        sys.exit(1 if failed else 0)
    elif args.command == "new-key":
        from imagegen.api.keys import hash_key, new_key

        token = new_key()
        print(f"# the key (give it to the client; it is not stored anywhere): {token}", file=sys.stderr)
        print(
            f'[[key]]\nname = "{args.name}"\nsha256 = "{hash_key(token)}"\nroles = {json.dumps(args.role)}\n'
            f"requests_per_minute = {args.requests_per_minute:g}\nmax_concurrent = {args.max_concurrent}"
        )
    elif args.command == "probe":
        import httpx

        settings = Settings()
        port = settings.metrics_port or settings.port
        try:
            ok = httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=5).status_code == 200
        except httpx.HTTPError:
            ok = False
        sys.exit(0 if ok else 1)
    elif args.command == "serve":
        from imagegen import logs
        from imagegen.serving import serve

        settings = Settings()
        logs.configure(settings.log_level, settings.log_format)
        serve(settings)


if __name__ == "__main__":
    main()
