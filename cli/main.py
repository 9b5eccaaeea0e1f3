"""The ``spotmesh`` command: run a mesh, talk to it, build its tiny model, benchmark it."""

from __future__ import annotations

import argparse
import sys

from cli import bench, client, preempt, up
from cli.simulate import command as simulate


def cmd_make_tiny(a: argparse.Namespace) -> int:
    from cli.tinymodel import make_tiny

    print(make_tiny(a.dir, quantization=a.quantization or None, seed=a.seed))
    return 0


def cmd_proto_gen(a: argparse.Namespace) -> int:
    from cli import protogen

    return protogen.main()


def cmd_cache_calibrate(a: argparse.Namespace) -> int:
    from cli import calibrate

    return calibrate.main(a.passthrough_args)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="spotmesh", description=__doc__)
    p.add_argument("--state-dir", default=None,
                   help="where the mesh keeps its state (default $SPOTMESH_STATE_DIR or "
                        "~/.local/state/spotmesh/default)")
    sub = p.add_subparsers(dest="command", required=True)
    up.add_parsers(sub)
    client.add_parsers(sub)
    preempt.add_parser(sub)
    simulate.add_parser(sub)

    model = sub.add_parser("model", help="model utilities").add_subparsers(dest="sub",
                                                                           required=True)
    mt = model.add_parser("make-tiny", help="write the tiny offline Llama model")
    mt.add_argument("dir")
    mt.add_argument("--quantization", choices=["", "awq", "w8a8"], default="")
    mt.add_argument("--seed", type=int, default=0)
    mt.set_defaults(fn=cmd_make_tiny)

    proto = sub.add_parser("proto", help="contract utilities").add_subparsers(dest="sub",
                                                                             required=True)
    pg = proto.add_parser("gen", help="regenerate spotmesh/v1 from protos/")
    pg.set_defaults(fn=cmd_proto_gen)

    cache = sub.add_parser("cache", help="semantic-cache tools").add_subparsers(dest="sub",
                                                                               required=True)
    cal = cache.add_parser("calibrate", add_help=False,
                           help="choose a similarity threshold from labelled data "
                                "(calibrate --help for its options)")
    cal.set_defaults(fn=cmd_cache_calibrate, passthrough=True)

    bench.add_parsers(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if getattr(args, "passthrough", False):
        # Tools with their own option parser (and --help) get the rest of the command line.
        args.passthrough_args = extra
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    return args.fn(args)


if __name__ == "__main__":
    sys.exit(main())
