"""`alignkit serve MODEL --port N`: placeholder until the server lands."""


def add_arguments(parser) -> None:
    parser.add_argument("model")
    parser.add_argument("--port", type=int, default=8000)


def run(args) -> int:
    raise NotImplementedError("alignkit serve is not implemented yet")
