"""How a kernel choice that differs from what was asked is reported: a WARNING once per
message, or an error under `attention.strict=True`. INFO is for choices that keep both the
kernel the user named and the memory class (O(L x block) vs dense O(L^2))."""

import logging

log = logging.getLogger('loomax')
_warned: set[str] = set()  # messages already warned about in this process (dedup only)


def fallback(message: str, *, strict: bool) -> None:
  """A fallback that changes the kernel the user named or its memory class."""
  if strict:
    raise ValueError(f'{message} [attention.strict=True refuses fallbacks; set '
                     'attention.strict=False to accept it]')
  if message not in _warned:
    _warned.add(message)
    log.warning('%s', message)


def cap_tile(value: int, cap: int, key: str, kernel: str) -> int:
  """`value` capped at `cap`; a WARNING (once) naming the config key when it is above."""
  if value > cap:
    message = (f'{key}={value} is above the {kernel} kernel\'s tile cap {cap}: using {cap} '
               f'(set {key}<={cap} to silence this)')
    if message not in _warned:
      _warned.add(message)
      log.warning('%s', message)
    return cap
  return value
