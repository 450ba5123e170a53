"""Names and tags of artifacts in storage ("name:tag", like OCI/Ollama references): the rules
in one place, so that the CLI refuses a bad name before it sends gigabytes and storage
refuses the same ones.

Pure: strings in, strings or InvalidName out.
"""

from __future__ import annotations

import re

DEFAULT_TAG = "latest"
MAX_NAME_LENGTH = 128
MAX_TAG_LENGTH = 128

_NAME_CHARS = re.compile(r"[a-z0-9./-]+")
# Like OCI path components: letters/digits, separated by runs of '.', '-'.
NAME_PART = re.compile(r"[a-z0-9]+(?:[.-]+[a-z0-9]+)*")
# Like OCI tags.
_TAG = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]*")


class InvalidName(ValueError):
    """A name, tag, file name or run id is not acceptable; the message says what to change
    and `field` which request field it was."""

    def __init__(self, message: str, *, field: str = "name") -> None:
        super().__init__(message)
        self.field = field


def validate_name(name: str) -> str:
    """`name` if it is a valid artifact name, else InvalidName saying what to change.

    Names are lowercase, like OCI/Ollama repository names: parts of letters a-z and digits
    joined by '.' or '-', with '/' between namespace parts (e.g. "library/llama-3.2-1b");
    at most 128 characters, no empty parts, no '..', not absolute."""
    if not isinstance(name, str) or not name:
        raise InvalidName("the name is empty; give a name like 'llama-3.2-1b' or 'team/llama-3.2-1b'")
    if len(name) > MAX_NAME_LENGTH:
        raise InvalidName(f"the name is {len(name)} characters long; at most {MAX_NAME_LENGTH} are allowed")
    if any(ord(c) < 0x20 or ord(c) == 0x7F for c in name):
        raise InvalidName(f"the name {name!r} contains a control character; use printable characters only")
    if name.startswith("/"):
        raise InvalidName(f"the name {name!r} starts with '/'; names are relative, like 'team/model'")
    if ".." in name.split("/"):
        raise InvalidName(f"the name {name!r} contains a '..' part; parent references are not allowed")
    if not _NAME_CHARS.fullmatch(name):
        bad = sorted({c for c in name if not _NAME_CHARS.fullmatch(c)})
        hint = f" (names are lowercase: try {name.lower()!r})" if name.lower() != name else ""
        raise InvalidName(
            f"the name {name!r} contains {', '.join(repr(c) for c in bad)}; allowed are lowercase letters a-z, "
            f"digits 0-9, '.', '-', and '/' between parts{hint}"
        )
    for part in name.split("/"):
        if not part:
            raise InvalidName(f"the name {name!r} has an empty part (a leading, trailing or doubled '/')")
        if not NAME_PART.fullmatch(part):
            raise InvalidName(
                f"the name part {part!r} of {name!r} must start and end with a letter or digit "
                "(use '.' or '-' only between them)"
            )
    return name


def validate_tag(tag: str) -> str:
    """`tag` if valid (like OCI tags: letters, digits, '_', '.', '-'; not starting with '.'
    or '-'; at most 128 characters), else InvalidName."""
    if not isinstance(tag, str) or not tag:
        raise InvalidName("the tag is empty; give a tag like 'latest' or 'q4_k_m'")
    if len(tag) > MAX_TAG_LENGTH:
        raise InvalidName(f"the tag is {len(tag)} characters long; at most {MAX_TAG_LENGTH} are allowed")
    if not _TAG.fullmatch(tag):
        raise InvalidName(
            f"the tag {tag!r} is not valid: use letters, digits, '_', '.' and '-', starting with a letter, digit or '_'"
        )
    return tag


def split_name_tag(ref: str) -> tuple[str, str]:
    """ "name:tag" -> (name, tag); a bare name gets DEFAULT_TAG."""
    name, sep, tag = ref.rpartition(":")
    if not sep or "/" in tag:
        return ref, DEFAULT_TAG
    return name, tag
