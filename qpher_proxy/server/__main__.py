"""``python -m qpher_proxy.server --config PATH --control-fd N [--listen-fds A,B]
[--gateway-index I] [--user UID:GID]``: a gateway process, started by the ``qpher-proxy serve``
supervisor (see :mod:`.privsep`), never by hand.

It inherits its control socket as descriptor ``N`` and its listening sockets (bound by the
supervisor, SO_REUSEPORT when ``server.workers`` > 1) and nothing else of the supervisor's;
without ``--listen-fds`` it binds its ports itself. It drops to ``--user`` (when given),
confines itself with Landlock, and serves with the KMS workers the supervisor hands over.
``--gateway-index``: which of the ``server.workers`` gateways it is (in its log lines when
there are several).
"""

from __future__ import annotations

import argparse
import socket
import sys


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m qpher_proxy.server", description=__doc__)
    p.add_argument("--config", required=True)
    p.add_argument("--control-fd", type=int, required=True)
    p.add_argument("--listen-fds", default=None, help="inherited listening sockets, comma-separated")
    p.add_argument("--gateway-index", type=int, default=0)
    p.add_argument("--user", default=None, help="UID:GID to run as after binding")
    args = p.parse_args(argv)

    from ..config import load_config
    from ..errors import ConfigError, QpherError
    from ..logs import set_process_fields
    from ..sandbox import RunAs
    from .confine import Confinement
    from .privsep import SupervisedKMS, inherited_listeners
    from .serve import run

    try:
        control = socket.socket(fileno=args.control_fd)
        listeners = inherited_listeners(args.listen_fds) if args.listen_fds else None
        cfg = load_config(args.config)
        if cfg.server.workers > 1:
            set_process_fields({"gateway": args.gateway_index})
        kms = SupervisedKMS(control)
        confinement = Confinement(RunAs.from_arg(args.user) if args.user else None, cfg.server.sandbox)
        return run(cfg, kms=kms, confinement=confinement, inherited=listeners)
    except ConfigError as exc:
        print(f"qpher-proxy: {exc.message}", file=sys.stderr)
        return 2
    except QpherError as exc:
        print(f"qpher-proxy: {exc.code}: {exc.message}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
