"""`alignkit eval-rm`: placeholder until evaluation lands."""


def add_arguments(parser) -> None:
    parser.add_argument("data")


def run(args) -> int:
    raise NotImplementedError("alignkit eval-rm is not implemented yet")
