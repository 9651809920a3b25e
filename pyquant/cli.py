"""The `pyquant` command."""

from __future__ import annotations

import argparse


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="pyquant", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    demo = commands.add_parser("demo", help="train a small model with torch.optim.Adam and pyquant.Adam8bit side by side")
    demo.add_argument("--epochs", type=int, default=30)
    commands.add_parser("info", help="show the backends and the instruction set pyquant uses here")
    args = parser.parse_args(argv)
    if args.command == "demo":
        from pyquant import demo as demo_module

        demo_module.main(epochs=args.epochs)
    elif args.command == "info":
        import torch

        from pyquant import _native, backends

        print(f"torch {torch.__version__}; CPU library: {_native.cpu_isa()}")
        for device in ("cpu", "cuda") if torch.cuda.is_available() else ("cpu",):
            usable = [name for name in backends.BACKENDS if backends.available(name, device)]
            print(f"{device}: default backend {backends.select(device)}; available: {', '.join(usable)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
