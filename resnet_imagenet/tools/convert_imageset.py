"""``convert_imageset``: Caffe's tool -- a folder or list file of images into an LMDB of Datums."""

from __future__ import annotations

import argparse

from resnet_imagenet.data.convert import convert_imageset
from resnet_imagenet.tools import add_command
from resnet_imagenet.tools._flags import add_convert_flags, convert_keywords, convert_options


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = add_command(
        sub,
        "convert_imageset",
        description="ROOT/ LISTFILE DB: LISTFILE lines are 'relative/path label'. ROOT/ DB: ROOT/<class>/ "
        "folders, classes sorted (or as --classes / --classes-from lists them) get labels 0..N-1, the class list "
        "goes to DB/classes.txt.",
    )
    p.add_argument("paths", nargs="+", metavar="ROOT [LISTFILE] DB")
    add_convert_flags(p)
    p.add_argument(
        "--classes",
        metavar="FILE",
        help="label by this class list (one name a line, its first word: ILSVRC's synsets.txt or synset_words.txt) "
        "instead of ROOT's sorted folders; the list goes into DB",
    )
    p.add_argument(
        "--classes-from",
        metavar="DB",
        help="label by the class list recorded in DB (e.g. the train LMDB, for a val/ lacking a class folder)",
    )
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    if len(args.paths) not in (2, 3):
        raise ValueError("usage: convert_imageset [flags] ROOT/ [LISTFILE] DB")
    root, listfile, db = (args.paths[0], None, args.paths[1]) if len(args.paths) == 2 else args.paths
    s = convert_imageset(
        root, listfile, db, convert_options(args), classes=args.classes, classes_from=args.classes_from,
        **convert_keywords(args),
    )  # fmt: skip
    print(f"{db}: {s.report()}")
    return 0
