// The tiled int8-activation matmul, written once over an instruction set: cpu_a8.cpp includes this file once per
// path, each time after defining `struct Isa` (16 int32 lanes `I`, 16 float lanes `F`, and the operations below).
//
// A tile is 16 output rows; int32 lane l of every vector is row l of the tile, so no lane is ever summed with
// another. A tile's codes are stored block after block (32 inputs a block, the int8 activation block), each block as
// BITS vectors of 64 bytes whose byte 4l + j holds row l's codes at inputs 4t + j, t = 0..7, in the fields of
// a8_fields.h. Step t of a block is inputs 4t..4t+3: row l's four codes of it are in lane l, and one vpdpbusd
// against the four int8 inputs broadcast to every lane sums them per row. So the weights stream once, in order,
// with no shuffle, and x needs no layout.
//
// y[r, n] = Σ_g s[n, g]·Σ_{b∈g} a[r, b]·Σ_{k∈b} q[n, k]·xi[r, k] − Σ_g (z·s)[n, g]·x̂sum[r, g].

template <int BITS>
constexpr A8Fields LAYOUT = a8_fields(BITS);

// Field F of BITS-bit codes at its place in the code (moved down by its shift, masked).
template <int BITS, int F>
inline Isa::I code_bits(const Isa::I* v) {
  constexpr A8Field f = LAYOUT<BITS>.at[F];
  constexpr int SHIFT = f.shift();
  const Isa::I moved = SHIFT > 0 ? Isa::template srl<SHIFT>(v[f.vec]) : v[f.vec];
  return Isa::mask(moved, static_cast<char>(((1 << f.width) - 1) << f.offset));
}

template <int BITS, int T, int F>
inline void or_step_field(Isa::I& code, const Isa::I* v) {
  if constexpr (LAYOUT<BITS>.at[F].step == T) code = Isa::or_(code, code_bits<BITS, F>(v));
}

// Step T's 64 byte codes, made whole from their fields.
template <int BITS, int T, size_t... F>
inline Isa::I step_code(const Isa::I* v, std::index_sequence<F...>) {
  Isa::I code = Isa::zero_i();
  (or_step_field<BITS, T, static_cast<int>(F)>(code, v), ...);
  return code;
}

// A block's int32 sums for R rows of x, in one of two ways:
// - codes (every path): each step's 64 byte codes are made whole (shift, mask, OR) and dotted once per row, into
//   CHAINS independent sums a row (steps taken in turns), so that few rows still fill the pipeline;
// - fields (Isa::FIELDS, up to 2 rows: decoding one sequence): each field is dotted where it lies in its byte,
//   masked but not moved, so that the sum gets its bits times 2^shift (a8_fields.h), into the sum of that shift; at
//   the block's end each sum is brought onto the code's weights (>> shift; exact: every term of it is a multiple of
//   2^shift). One dot product a field and no shifts; it needs vpdpbusd's int32 products (vpmaddubsw's int16 pairs
//   would saturate at 2^shift·127).
template <int R>
constexpr int CHAINS = R >= 4 ? 1 : 4 / R;
template <int BITS>
constexpr bool shift_used(int s) {
  for (int i = 0; i < LAYOUT<BITS>.count; ++i)
    if (LAYOUT<BITS>.at[i].shift() == s) return true;
  return false;
}
template <int R>
constexpr bool FIELDS = Isa::FIELDS && R <= 2;
template <int R>
constexpr int SLOTS = FIELDS<R> ? 8 : CHAINS<R>;  // fields: one sum a shift (0..7)

template <int BITS, int R, int F>
inline void field_dot(const Isa::I* v, const int8_t* const (&x)[R], Isa::I (&isum)[R][SLOTS<R>]) {
  constexpr A8Field f = LAYOUT<BITS>.at[F];
  const Isa::I field = Isa::mask(v[f.vec], static_cast<char>(((1 << f.width) - 1) << f.pos));
  for (int r = 0; r < R; ++r) isum[r][f.shift()] = Isa::dot4(isum[r][f.shift()], field, x[r] + 4 * f.step);
}

template <int BITS, int R, int T>
inline void code_dot(const Isa::I* v, const int8_t* const (&x)[R], Isa::I (&isum)[R][SLOTS<R>]) {
  const Isa::I code = step_code<BITS, T>(v, std::make_index_sequence<LAYOUT<BITS>.count>{});
  for (int r = 0; r < R; ++r) isum[r][T % CHAINS<R>] = Isa::dot4(isum[r][T % CHAINS<R>], code, x[r] + 4 * T);
}

// A block's dot products for R rows of x, into isum: one a field, or one a step.
template <int BITS, int R, size_t... F, size_t... T>
inline void block_dots(const Isa::I* v, const int8_t* const (&x)[R], Isa::I (&isum)[R][SLOTS<R>],
                       std::index_sequence<F...>, std::index_sequence<T...>) {
  if constexpr (FIELDS<R>)
    (field_dot<BITS, R, static_cast<int>(F)>(v, x, isum), ...);
  else
    (code_dot<BITS, R, static_cast<int>(T)>(v, x, isum), ...);
}

// Slot S of a block's sums onto the codes' weights (fields: its shift undone; codes: as it is).
template <int R, int S>
inline Isa::I slot_sum(Isa::I sum) {
  if constexpr (FIELDS<R> && S > 0) return Isa::template sra32<S>(sum);
  else return sum;
}

// The block's sum of row r: its slots, each onto the codes' weights, added (unused shifts' slots skipped).
template <int BITS, int R, size_t... S>
inline Isa::I block_sum(const Isa::I (&slots)[SLOTS<R>], std::index_sequence<S...>) {
  Isa::I sum = Isa::zero_i();
  ((sum = !FIELDS<R> || shift_used<BITS>(static_cast<int>(S)) ? Isa::add(sum, slot_sum<R, static_cast<int>(S)>(slots[S]))
                                                           : sum),
   ...);
  return sum;
}

constexpr int64_t PREFETCH = 2048;  // how far ahead of its reads a tile's weight stream is asked for

// Tile `tile` (its 16 rows of y) against rows r0..r0+R of x.
template <int BITS, int R>
void tile_rows(const TileArgs& t, int64_t tile, int64_t r0) {
  const int64_t blocks = t.in / 32, per_group = t.group / 32;
  const uint8_t* w = t.codes + tile * blocks * 64 * BITS;
  const float* s = t.scales + tile * t.groups * 16;
  const float* zs = t.zero_scales + tile * t.groups * 16;
  Isa::F acc[R];
  for (int r = 0; r < R; ++r) acc[r] = Isa::zero_f();
  for (int64_t g = 0, b = 0; g < t.groups; ++g) {
    Isa::F part[R];
    for (int r = 0; r < R; ++r) part[r] = Isa::zero_f();
    for (const int64_t last = std::min(b + per_group, blocks); b < last; ++b) {
      Isa::I v[BITS], isum[R][SLOTS<R>];
      const int8_t* x[R];
      for (int i = 0; i < BITS; ++i) {
        _mm_prefetch(reinterpret_cast<const char*>(w + (b * BITS + i) * 64 + PREFETCH), _MM_HINT_T0);
        v[i] = Isa::load(w + (b * BITS + i) * 64);
      }
      for (int r = 0; r < R; ++r) {
        for (int c = 0; c < SLOTS<R>; ++c) isum[r][c] = Isa::zero_i();
        x[r] = t.xi + (r0 + r) * t.in + b * 32;
      }
      block_dots<BITS, R>(v, x, isum, std::make_index_sequence<LAYOUT<BITS>.count>{}, std::make_index_sequence<8>{});
      for (int r = 0; r < R; ++r)
        part[r] = Isa::fma_int(part[r], block_sum<BITS, R>(isum[r], std::make_index_sequence<SLOTS<R>>{}),
                               t.a[(r0 + r) * blocks + b]);
    }
    for (int r = 0; r < R; ++r)
      acc[r] = Isa::fnma(Isa::fma(acc[r], part[r], s + g * 16), zs + g * 16, t.xhat_sum[(r0 + r) * t.groups + g]);
  }
  const int64_t live = std::min<int64_t>(16, t.out - tile * 16);
  for (int r = 0; r < R; ++r) {
    float* y = t.y + (r0 + r) * t.out + tile * 16;
    if (live == 16) {
      Isa::store(y, acc[r]);
    } else {
      float lanes[16];
      Isa::store(lanes, acc[r]);
      std::copy(lanes, lanes + live, y);
    }
  }
}

// Tiles begin..end against every row of x, 8 rows of x at most a pass.
template <int BITS>
void tiles(const TileArgs& t, int64_t begin, int64_t end) {
  for (int64_t tile = begin; tile < end; ++tile)
    for (int64_t r0 = 0; r0 < t.rows; r0 += 8) {
      switch (std::min<int64_t>(8, t.rows - r0)) {
        case 1: tile_rows<BITS, 1>(t, tile, r0); break;
        case 2: tile_rows<BITS, 2>(t, tile, r0); break;
        case 3: tile_rows<BITS, 3>(t, tile, r0); break;
        case 4: tile_rows<BITS, 4>(t, tile, r0); break;
        case 5: tile_rows<BITS, 5>(t, tile, r0); break;
        case 6: tile_rows<BITS, 6>(t, tile, r0); break;
        case 7: tile_rows<BITS, 7>(t, tile, r0); break;
        default: tile_rows<BITS, 8>(t, tile, r0); break;
      }
    }
}

void run_tiles(const TileArgs& t, int64_t begin, int64_t end) {
  switch (t.bits) {
    case 1: tiles<1>(t, begin, end); break;
    case 2: tiles<2>(t, begin, end); break;
    case 3: tiles<3>(t, begin, end); break;
    case 4: tiles<4>(t, begin, end); break;
    case 5: tiles<5>(t, begin, end); break;
    case 6: tiles<6>(t, begin, end); break;
    default: tiles<7>(t, begin, end); break;
  }
}
