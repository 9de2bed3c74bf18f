// Where a block's codes lie in the a8 layout (omniquant.kernels.cpu.a8_layout, read by a8_tiles.h): for BITS-bit
// codes, a block of a tile is BITS vectors of 64 bytes, and byte 4l + j of every vector belongs to tile row l and
// inputs 4t + j of the block's steps t = 0..7 (32 inputs). Those BITS bytes hold the 8 steps' codes, 8·BITS bits, as
// fields: a field is `width` bits of step `step`'s code, from code bit `offset`, at bits pos..pos+width-1 of the
// byte of vector `vec`.
//
// - Whole codes first: a byte holds per = 8/BITS of them, at bits 0, BITS, 2·BITS, ..., steps in order (vector m:
//   steps per·m ..). So 1-, 2- and 4-bit codes fill their bytes with whole codes (8 fields, one a step).
// - The steps left over (3 bits: steps 6 and 7; 5, 6, 7 bits: the last 3, 2, 1) go into the bits above the whole
//   codes, code after code, bytes in order; the run of a code's bits in one byte takes that byte's highest free bits.
//   For 3 bits: step 6's bits 0-1 at bits 6-7 of vector 0, its bit 2 at bit 7 of vector 1; step 7's bit 0 at bit 6
//   of vector 1, its bits 1-2 at bits 6-7 of vector 2. 10 fields, so 10 dot products a block where bit planes (2
//   and 1 bits) take 16.
//
// A field read in place (masked, not moved) is its bits times 2^shift, shift = pos − offset, which lies in 0..7:
// whole codes have offset 0, and a left-over run lies above per·BITS ≥ BITS bits, beyond any offset.
#pragma once

#include <algorithm>

struct A8Field {
  int vec, pos, width, step, offset;
  constexpr int shift() const { return pos - offset; }
};

struct A8Fields {
  A8Field at[16];  // 14 at most (7 bits)
  int count;
};

constexpr A8Fields a8_fields(int bits) {
  A8Fields out{};
  const int per = 8 / bits, whole = std::min(8, per * bits);
  for (int t = 0; t < whole; ++t) out.at[out.count++] = {t / per, (t % per) * bits, bits, t, 0};
  int top[8] = {8, 8, 8, 8, 8, 8, 8, 8};  // each byte's free bits: per·bits .. top-1
  for (int t = whole, m = 0; t < 8; ++t)
    for (int offset = 0; offset < bits;) {
      while (top[m] == per * bits) ++m;
      const int width = std::min(bits - offset, top[m] - per * bits);
      top[m] -= width;
      out.at[out.count++] = {m, top[m], width, t, offset};
      offset += width;
    }
  return out;
}
