// The tiled int8-activation matmul, written once over an instruction set: cpu_a8.cpp includes this file once per
// path, each time after defining `struct Isa` (16 int32 lanes `I`, 16 float lanes `F`, and the operations below).
//
// A tile is 16 output rows; int32 lane l of every vector is row l of the tile, so no lane is ever summed with
// another. A tile's codes are stored block after block (32 inputs a block, the int8 activation block), and each
// block's planes (widest first, as omniquant.packing.planes) as W vectors of 64 bytes for a W-bit plane: byte
// 4l + j of vector v holds, at bits iW..iW+W-1, the plane's bits of row l at input 4(v·8/W + i) + j. Step t
// (0..7) of a block is inputs 4t..4t+3: each plane gives its bits of step t with one shift and a mask, OR-ed into
// 64 byte codes (row l's four codes in lane l), and one vpdpbusd against the four int8 inputs broadcast to every
// lane sums them per row (or, for one sequence, each plane's bits are dotted in place: block_step). So the
// weights stream once, in order, with no shuffle, and x needs no layout.
//
// y[r, n] = Σ_g s[n, g]·Σ_{b∈g} a[r, b]·Σ_{k∈b} q[n, k]·xi[r, k] − Σ_g (z·s)[n, g]·x̂sum[r, g].

// Planes of BITS-bit codes, widest first: width, offset in the code, first vector in the block.
constexpr int plane_width(int bits, int p) {
  int seen = 0;
  for (int w : {4, 2, 1})
    if (bits & w) {
      if (seen == p) return w;
      ++seen;
    }
  return 0;
}
constexpr int plane_offset(int bits, int p) {
  return p == 0 ? 0 : plane_offset(bits, p - 1) + plane_width(bits, p - 1);
}
constexpr int n_planes(int bits) { return (bits & 1) + (bits >> 1 & 1) + (bits >> 2 & 1); }

// How far plane p's bits of step t lie above their place in the code (negative: below).
constexpr int shift_of(int bits, int p, int t) {
  const int w = plane_width(bits, p);
  return (t % (8 / w)) * w - plane_offset(bits, p);
}

// Plane P's bits of step T, at their place in the code.
template <int BITS, int P, int T>
inline Isa::I plane_bits(const Isa::I* v) {
  constexpr int W = plane_width(BITS, P), O = plane_offset(BITS, P), PER = 8 / W;
  constexpr int SHIFT = shift_of(BITS, P, T);  // right (or left, if negative) onto bit O
  const Isa::I vec = v[O + T / PER];          // a W-bit plane's vectors follow the wider planes' (O of them)
  const Isa::I moved = SHIFT > 0 ? Isa::template srl<(SHIFT > 0 ? SHIFT : 0)>(vec)
                                 : Isa::template sll<(SHIFT < 0 ? -SHIFT : 0)>(vec);
  return Isa::mask(moved, static_cast<char>(((1 << W) - 1) << O));
}

template <int BITS, int T, size_t... P>
inline Isa::I step_codes(const Isa::I* v, std::index_sequence<P...>) {
  Isa::I code = Isa::zero_i();
  ((code = Isa::or_(code, plane_bits<BITS, static_cast<int>(P), T>(v))), ...);
  return code;
}

// A block's int32 sums for R rows of x, in one of two ways:
// - codes (every path): each step's 64 byte codes are made whole (shift, mask, OR) and dotted once per row, into
//   CHAINS independent sums a row (steps taken in turns), so that few rows still fill the pipeline;
// - fields (Isa::FIELDS, up to 2 rows: decoding one sequence): each plane's bits of a step are dotted where they
//   lie in their byte, masked but not shifted, so that the byte holds bits·2^s (s = shift_of: the field's place
//   less the plane's offset in the code), into the sum of that s; at the block's end each sum is brought onto the
//   code's weights (>> s, or << -s; exact: every term of it is a multiple of 2^s). One instruction a step and
//   plane fewer; it needs vpdpbusd's int32 products (vpmaddubsw's int16 pairs would saturate at 2^s·127).
template <int R>
constexpr int CHAINS = R >= 4 ? 1 : 4 / R;
constexpr int shift_min(int bits) {
  int m = 8;
  for (int p = 0; p < n_planes(bits); ++p)
    for (int t = 0; t < 8; ++t) m = std::min(m, shift_of(bits, p, t));
  return m;
}
constexpr bool shift_used(int bits, int s) {
  for (int p = 0; p < n_planes(bits); ++p)
    for (int t = 0; t < 8; ++t)
      if (shift_of(bits, p, t) == s) return true;
  return false;
}
template <int R>
constexpr bool FIELDS = Isa::FIELDS && R <= 2;
template <int BITS, int R>
constexpr int SLOTS = FIELDS<R> ? 8 - shift_min(BITS) : CHAINS<R>;  // shifts run from shift_min to 7 at most

template <int BITS, int R, int P, int T>
inline void field_step(const Isa::I* v, const int8_t* const (&x)[R], Isa::I (&isum)[R][SLOTS<BITS, R>]) {
  constexpr int W = plane_width(BITS, P), O = plane_offset(BITS, P), PER = 8 / W;
  constexpr int SLOT = shift_of(BITS, P, T) - shift_min(BITS);
  const Isa::I field = Isa::mask(v[O + T / PER], static_cast<char>(((1 << W) - 1) << (T % PER) * W));
  for (int r = 0; r < R; ++r) isum[r][SLOT] = Isa::dot4(isum[r][SLOT], field, x[r] + 4 * T);
}

// Step T of a block for R rows of x, into isum.
template <int BITS, int R, int T, size_t... P>
inline void block_step(const Isa::I* v, const int8_t* const (&x)[R], Isa::I (&isum)[R][SLOTS<BITS, R>],
                       std::index_sequence<P...> planes) {
  if constexpr (FIELDS<R>) {
    (field_step<BITS, R, static_cast<int>(P), T>(v, x, isum), ...);
  } else {
    const Isa::I code = step_codes<BITS, T>(v, planes);
    for (int r = 0; r < R; ++r) isum[r][T % CHAINS<R>] = Isa::dot4(isum[r][T % CHAINS<R>], code, x[r] + 4 * T);
  }
}

template <int BITS, int R, size_t... T>
inline void block_steps(const Isa::I* v, const int8_t* const (&x)[R], Isa::I (&isum)[R][SLOTS<BITS, R>],
                        std::index_sequence<T...>) {
  (block_step<BITS, R, static_cast<int>(T)>(v, x, isum, std::make_index_sequence<n_planes(BITS)>{}), ...);
}

// Slot S of a block's sums onto the codes' weights (fields: its shift undone; codes: as it is).
template <int BITS, int R, int S>
inline Isa::I slot_sum(Isa::I sum) {
  if constexpr (!FIELDS<R>) {
    return sum;
  } else {
    constexpr int SHIFT = S + shift_min(BITS);
    if constexpr (SHIFT > 0) return Isa::template sra32<(SHIFT > 0 ? SHIFT : 0)>(sum);
    else if constexpr (SHIFT < 0) return Isa::template sll32<(SHIFT < 0 ? -SHIFT : 0)>(sum);
    else return sum;
  }
}

// The block's sum of row r: its slots, each onto the codes' weights, added (unused fields' slots skipped).
template <int BITS, int R, size_t... S>
inline Isa::I block_sum(const Isa::I (&slots)[SLOTS<BITS, R>], std::index_sequence<S...>) {
  Isa::I sum = Isa::zero_i();
  ((sum = !FIELDS<R> || shift_used(BITS, static_cast<int>(S) + shift_min(BITS))
              ? Isa::add(sum, slot_sum<BITS, R, static_cast<int>(S)>(slots[S]))
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
      Isa::I v[BITS], isum[R][SLOTS<BITS, R>];
      const int8_t* x[R];
      for (int i = 0; i < BITS; ++i) {
        _mm_prefetch(reinterpret_cast<const char*>(w + (b * BITS + i) * 64 + PREFETCH), _MM_HINT_T0);
        v[i] = Isa::load(w + (b * BITS + i) * 64);
      }
      for (int r = 0; r < R; ++r) {
        for (int c = 0; c < SLOTS<BITS, R>; ++c) isum[r][c] = Isa::zero_i();
        x[r] = t.xi + (r0 + r) * t.in + b * 32;
      }
      block_steps<BITS, R>(v, x, isum, std::make_index_sequence<8>{});
      for (int r = 0; r < R; ++r)
        part[r] = Isa::fma_int(part[r], block_sum<BITS, R>(isum[r], std::make_index_sequence<SLOTS<BITS, R>>{}),
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
