"""Memory traffic of a compiled step, read off its optimized HLO.

Each top-level instruction of the entry computation that is not free
(parameters, constants, tuples, get-tuple-element and bitcasts are) is one
kernel: it reads its operands once and writes its result once. Summing those
bytes gives the traffic the compiled program implies, to compare with the
minimum a step must move; counting the kernels that touch a large array gives
the number of passes over memory.
"""

import math
import re

_DTYPE_BYTES = {
    'pred': 1, 's8': 1, 'u8': 1, 's16': 2, 'u16': 2, 'f16': 2, 'bf16': 2,
    's32': 4, 'u32': 4, 'f32': 4, 's64': 8, 'u64': 8, 'f64': 8, 'c64': 8,
    'c128': 16, 'token': 0,
}
_ARRAY = re.compile(r'\b([a-z]+[0-9]*)\[([0-9,]*)\]')
_INSTRUCTION = re.compile(
    r'^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=\s*(.+?)\s+([\w\-]+)\((.*)$')
_FREE = {'parameter', 'constant', 'tuple', 'get-tuple-element', 'bitcast',
         'after-all', 'partition-id', 'replica-id', 'iota'}


def _type_bytes(text):
  """Bytes of an HLO type: an array type or a tuple of them."""
  total = 0
  for dtype, dims in _ARRAY.findall(text):
    if dtype not in _DTYPE_BYTES:
      continue
    size = math.prod(int(d) for d in dims.split(',') if d) if dims else 1
    total += size * _DTYPE_BYTES[dtype]
  return total


def _body(lines, start):
  """The lines of the computation whose header is `lines[start]`."""
  body = []
  for line in lines[start + 1:]:
    if line.startswith('}'):
      break
    body.append(line)
  return body


def _entry_lines(hlo_text):
  lines = hlo_text.splitlines()
  return _body(lines, next(i for i, line in enumerate(lines)
                           if line.startswith('ENTRY')))


def _computation_lines(hlo_text, name):
  """The body lines of the computation called `name`."""
  lines = hlo_text.splitlines()
  start = next((i for i, line in enumerate(lines)
                if line.startswith(f'%{name} ') or line.startswith(f'{name} ')),
               None)
  if start is None:
    return []
  return _body(lines, start)


def _loop_passthrough(hlo_text, body_name):
  """Indices of a while body's tuple elements it returns unchanged."""
  lines = _computation_lines(hlo_text, body_name)
  elements = {}
  root = None
  for line in lines:
    match = _INSTRUCTION.match(line)
    if not match:
      continue
    name, _, opcode, rest = match.groups()
    if opcode == 'get-tuple-element':
      index = re.search(r'index=(\d+)', rest)
      if index and re.match(r'\s*%[\w.\-]+\)', rest):
        elements[name] = int(index.group(1))
    if line.lstrip().startswith('ROOT') and opcode == 'tuple':
      root = re.findall(r'%([\w.\-]+)', rest.split(')')[0])
  if root is None:
    return set()
  return {i for i, operand in enumerate(root) if elements.get(operand) == i}


def _tuple_parts(type_text):
  """Bytes of each element of a (flat) tuple type."""
  return [_type_bytes(m.group(0)) for m in _ARRAY.finditer(type_text)]


def kernel_traffic(hlo_text, large_bytes=1 << 16):
  """Per kernel of the entry computation: (name, opcode, read, written).

  Only operands and results of at least `large_bytes` are counted, so the
  scalar bookkeeping (step counts, per-leaf sums) does not blur the picture.
  """
  sizes = {}
  kernels = []
  for line in _entry_lines(hlo_text):
    match = _INSTRUCTION.match(line)
    if not match:
      continue
    name, type_text, opcode, rest = match.groups()
    out_bytes = _type_bytes(type_text)
    sizes[name] = out_bytes
    if opcode in _FREE:
      continue
    # The operands are the %names before the closing parenthesis of the call.
    depth, end = 1, 0
    for end, char in enumerate(rest):
      depth += (char == '(') - (char == ')')
      if depth == 0:
        break
    operands = dict.fromkeys(re.findall(r'%([\w.\-]+)', rest[:end]))
    read = sum(sizes.get(o, 0) for o in operands
               if sizes.get(o, 0) >= large_bytes)
    written = sum(b for b in (_type_bytes(m.group(0)) for m in _ARRAY.finditer(type_text))
                  if b >= large_bytes)
    body = re.search(r'body=%?([\w.\-]+)', rest)
    if opcode == 'while' and body:
      # A loop over chunks reads each carried buffer once and writes back
      # only those its body rewrites (not those it passes through).
      unchanged = _loop_passthrough(hlo_text, body.group(1))
      parts = _tuple_parts(type_text)
      read = sum(b for b in parts if b >= large_bytes)
      written = sum(b for i, b in enumerate(parts)
                    if b >= large_bytes and i not in unchanged)
    if read or written:
      kernels.append((name, opcode, read, written))
  return kernels


def summarize(hlo_text, param_bytes, large_bytes=1 << 16):
  """Traffic of the compiled step in units of the params' bytes.

  Returns a dict: `kernels` (kernels touching a large array), `read`,
  `written` and `total` (bytes / param bytes), and `kernels_per_leaf`
  (kernels per large leaf, the number of passes over memory).
  """
  kernels = kernel_traffic(hlo_text, large_bytes)
  read = sum(k[2] for k in kernels)
  written = sum(k[3] for k in kernels)
  return {
      'kernels': len(kernels),
      'read': read / param_bytes,
      'written': written / param_bytes,
      'total': (read + written) / param_bytes,
  }
