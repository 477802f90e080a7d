using System.Numerics.Tensors;
using System.Runtime.CompilerServices;
using System.Runtime.Intrinsics;
using System.Runtime.Intrinsics.X86;
using PaliGemma.CpuOnly.Kernels;
using PaliGemma.CpuOnly.Tensors;

namespace PaliGemma.CpuOnly.Quant;

/// <summary>
/// y = x Wᵀ + b for q8 or nf4 weights with the activations quantized too: each x row is cut into blocks of 32 along K, every
/// block gets one fp32 scale (absmax / L) and integer codes in [-L, L], and each (x block, W block) pair is one exact
/// integer dot product, scaled once by both block scales and accumulated in fp32 (in block order, by a fused multiply-add).
/// An nf4 block of 64 is two blocks of 32 here: its codes become integers through a 16-entry table
/// (<see cref="Nf4Level"/>) and both halves share the scale absmax · (1 / level).
/// Two kinds of path: int8 activations (L = 127) on VNNI (<c>vpdpbusd</c>: 4 byte products summed into each int32 lane),
/// and int16 activations (L = 32767) on <c>vpmaddwd</c> (2 int16 products per lane) with AVX-512BW, AVX2 or SSE2 + FMA;
/// the int16 paths run as many multiply-adds per instruction as they would on int8 codes, so they keep the extra precision.
/// </summary>
/// <remarks>
/// The vectors run across x rows: the quantized activations are stored in groups of <c>XLanes</c> rows (one vector),
/// and within a (group, block) step by step along K, each step one 32-bit word per row (4 int8 codes for VNNI, 2 int16
/// codes otherwise). The micro-kernel loads a step of two x groups and multiplies it by one 32-bit step of a W row
/// broadcast to every lane, so each int32 lane ends a block holding one (x row, W row) block dot product: no horizontal
/// sums, and W is read in its stored row-major block layout. Each work item copies its W rows a K chunk at a time into a
/// small buffer (for the int16 paths widened to int16; zero rows pad a partial tile). VNNI multiplies unsigned by signed
/// bytes: the staged W codes are offset by +128, and each accumulator starts at -128 times its x block's code sum
/// (computed while quantizing), which cancels the offset exactly. nf4 rows are staged from their nibbles by a table
/// lookup (<c>vpermw</c> on AVX-512BW, <c>pshufb</c> otherwise), so the micro-kernels see the same integer layout as for q8.
/// </remarks>
internal static unsafe class IntegerGemm
{
    /// <summary>Vnni256: int8 activations on AVX-VNNI. Vector128/256/512: int16 activations on SSE2/AVX2/AVX-512BW.</summary>
    internal enum Path { None, Vector128, Vector256, Vector512, Vnni256 }

    /// <summary>The int8-activation path, when this CPU has one (else None).</summary>
    internal static Path BestInt8 { get; } = IsSupported(Path.Vnni256) ? Path.Vnni256 : Path.None;

    /// <summary>The widest int16-activation path this CPU runs (None: no integer multiply-add; the caller uses the fp32 panels).</summary>
    internal static Path BestInt16 { get; } =
        IsSupported(Path.Vector512) ? Path.Vector512 : IsSupported(Path.Vector256) ? Path.Vector256 : IsSupported(Path.Vector128) ? Path.Vector128 : Path.None;

    internal static bool IsSupported(Path path) => path switch
    {
        Path.Vnni256 => AvxVnni.IsSupported && Avx2.IsSupported && Fma.IsSupported,
        Path.Vector512 => Avx512BW.IsSupported && Avx512F.IsSupported,
        Path.Vector256 => Avx2.IsSupported && Fma.IsSupported,
        Path.Vector128 => Sse2.IsSupported && Fma.IsSupported,
        _ => false,
    };

    /// <summary>Largest activation code magnitude on a path: 127 (int8) or 32767 (int16).</summary>
    internal static int ActivationLimit(Path path) => path == Path.Vnni256 ? 127 : short.MaxValue;

    /// <summary>Blocks whose absmax is below this are encoded as zeros (L / absmax would overflow for tiny subnormals).</summary>
    internal const float MinAbsMax = 1e-30f;

    /// <summary>
    /// The integer an nf4 code stands for is round(NF4[code] · level) and its block's scale absmax · (1 / level). int16 paths:
    /// level 2048, the largest that keeps a block's int32 sum exact: 32 products of |x code| ≤ 32767 and |W code| ≤ 2048
    /// sum to at most 32 · 32767 · 2048 = 2,147,418,112 ≤ 2^31 - 1 = 2,147,483,647 (and a vpmaddwd pair to at most
    /// 2 · 32767 · 2048), every partial sum is bounded by the same, and the sums are converted to fp32 block by block.
    /// The table then moves a weight by at most 1/4096 of its absmax, about a hundredth of nf4's own rounding (half the
    /// gap between neighbouring codes, 0.04 of absmax around 0), and 2^-11 · absmax is exact in fp32. VNNI multiplies
    /// bytes: level 127 (at most 1/254 of absmax, as coarse as its int8 activations).
    /// </summary>
    internal static int Nf4Level(Path path) => path == Path.Vnni256 ? Nf4Int8Level : Nf4Int16Level;

    /// <summary>The factor that turns an nf4 absmax into the block scale, absmax · (1 / level): exactly absmax / 2048 on the int16 paths.</summary>
    internal static float Nf4InverseLevel(Path path) => 1f / Nf4Level(path);

    private const int Nf4Int16Level = 2048, Nf4Int8Level = 127;

    /// <summary>round(NF4[code] · level) for the int16 paths, twice over (vpermw reads 5 index bits: the high nibble's bit 0 may stay in bit 4).</summary>
    private static readonly short[] s_nf4Int16Codes = BuildNf4Int16Table();
    /// <summary>The same codes as two pshufb tables: their low bytes, then their high bytes.</summary>
    private static readonly byte[] s_nf4Int16Bytes = BuildNf4ByteTables();
    /// <summary>round(NF4[code] · 127) + 128 for VNNI (unsigned bytes, as its staged q8 codes), once per 128-bit lane.</summary>
    private static readonly byte[] s_nf4OffsetBytes = BuildNf4OffsetTable();

    private static int Nf4Integer(int code, int level) => (int)MathF.Round(Quantizer.Nf4Codes[code] * level);

    private static short[] BuildNf4Int16Table()
    {
        var table = new short[32];
        for (int i = 0; i < table.Length; i++) table[i] = (short)Nf4Integer(i % 16, Nf4Int16Level);
        return table;
    }

    private static byte[] BuildNf4ByteTables()
    {
        var table = new byte[32];
        for (int i = 0; i < 16; i++)
        {
            int code = Nf4Integer(i, Nf4Int16Level);
            table[i] = (byte)code;
            table[16 + i] = (byte)(code >> 8);
        }
        return table;
    }

    private static byte[] BuildNf4OffsetTable()
    {
        var table = new byte[32];
        for (int i = 0; i < table.Length; i++) table[i] = (byte)(Nf4Integer(i % 16, Nf4Int8Level) + 128);
        return table;
    }

    private const int BlockSize = 32;
    // Most W rows per work item and K blocks staged at a time: 64 rows of 32 blocks is 64 KB of codes (128 KB widened).
    // Larger items (fewer passes over the x codes) and shorter chunks (an x panel in L1) measured no faster.
    private const int TileRows = 64;
    private const int ChunkBlocks = 32;
    // Work items split the W rows at multiples of 16: each item's y columns then start on a 64-byte line (when y's rows
    // do), so the 16 x 16 transposes store whole lines and two threads never write one line.
    private const int RangeAlignment = 16;
    // Below this many multiply-adds the fork/join costs more than it saves.
    private const long ParallelThreshold = 1L << 20;

    /// <summary>How one path lays out its operands.</summary>
    private readonly struct Layout(Path path)
    {
        public readonly Path Path = path;
        /// <summary>x rows per vector (int32 lanes).</summary>
        public readonly int XLanes = path switch { Path.Vector512 => 16, Path.Vector128 => 4, _ => 8 };
        /// <summary>W rows per micro-kernel call: 8 where 32 vector registers hold the accumulators, else 4.</summary>
        public readonly int WRows = path is Path.Vnni256 or Path.Vector512 ? 8 : 4;
        /// <summary>Bytes per code: VNNI multiplies bytes, the others int16.</summary>
        public readonly int CodeSize = path == Path.Vnni256 ? 1 : 2;
        /// <summary>x rows per micro-kernel call: two vectors.</summary>
        public int XRows => 2 * XLanes;
        /// <summary>32-bit steps per block.</summary>
        public int Steps => BlockSize * CodeSize / 4;
        /// <summary>Bytes of one (x group, block).</summary>
        public int GroupBlockBytes => BlockSize * CodeSize * XLanes;
    }

    /// <summary>
    /// y[m, n] = Σ_b (sx[m, b] · sw[n, b]) · Σ_i qx[m, b, i] · qw[n, b, i] + bias[n] (fp32 accumulation in block order),
    /// then y = cap · tanh(y / cap) when <paramref name="softCap"/> &gt; 0. Operands are checked by the caller.
    /// </summary>
    internal static void Multiply(ReadOnlySpan<float> x, int rows, QuantizedMatrix w, ReadOnlySpan<float> bias, Span<float> y, float softCap, Path path)
    {
        if (w.Format is not (QuantFormat.Q8 or QuantFormat.Nf4))
            throw new ArgumentException($"integer activations need q8 or nf4 weights; {w} is {w.Format.Name()}", nameof(w));
        if (!IsSupported(path))
            throw new PlatformNotSupportedException($"the {path} integer GEMM needs instructions this CPU lacks");
        var layout = new Layout(path);
        int n = w.Rows, blocks = KBlocks(w);
        int paddedRows = (rows + layout.XRows - 1) / layout.XRows * layout.XRows;
        int groups = paddedRows / layout.XLanes;
        long codeBytes = (long)groups * blocks * layout.GroupBlockBytes;
        if (codeBytes > Array.MaxLength)
            throw new ArgumentException($"{rows} rows of K = {w.Cols} need {codeBytes} bytes of quantized activations, more than one array holds", nameof(rows));

        // Per calling thread, kept between calls (prefill runs the same shapes layer after layer).
        byte[] codes = t_codes is { } c && c.Length >= codeBytes ? c : (t_codes = GC.AllocateUninitializedArray<byte>((int)codeBytes, pinned: true));
        float[] scales = t_scales is { } s && s.Length >= paddedRows * blocks ? s : (t_scales = GC.AllocateUninitializedArray<float>(paddedRows * blocks, pinned: true));
        int[] sums = t_codeSums is { } z && z.Length >= paddedRows * blocks ? z : (t_codeSums = GC.AllocateUninitializedArray<int>(paddedRows * blocks, pinned: true));
        try
        {
            fixed (float* xp = x)
            fixed (float* bp = bias)
            fixed (float* yp = y)
            fixed (byte* cp = codes)
            fixed (float* sp = scales)
            fixed (int* zp = sums)
            {
                bool parallel = (long)rows * n * w.Cols >= ParallelThreshold;
                var activations = new QuantizedActivations(layout, cp, sp, zp, blocks);
                KernelThreading.For(groups, parallel, new QuantizeGroups(activations, xp, rows, w.Cols));

                // Work items: W row ranges of at most TileRows (whole RangeAlignment units, split evenly) times x row
                // slices. With several threads the item count is made a multiple of the thread count (more ranges,
                // else more slices for narrow outputs), so that equal items end together.
                int threads = parallel ? KernelThreading.MaxThreads : 1;
                int units = paddedRows / layout.XRows;
                int wUnits = (n + RangeAlignment - 1) / RangeAlignment;
                int ranges = (wUnits + TileRows / RangeAlignment - 1) / (TileRows / RangeAlignment);
                int slices = 1;
                while ((ranges * slices) % threads != 0 && ranges < wUnits)
                    ranges++;
                while ((ranges * slices) % threads != 0 && slices < units)
                    slices++;
                int[] claims = t_claims ??= GC.AllocateArray<int>(ClaimStride, pinned: true);
                fixed (int* next = claims)
                {
                    *next = 0;
                    var job = new Tiles(activations, w, rows, units, slices, wUnits, ranges, next, bias.IsEmpty ? null : bp, yp, softCap);
                    KernelThreading.For(Math.Min(threads, ranges * slices), parallel, job);
                }
            }
        }
        finally
        {
            // Very long prompts would otherwise pin their buffers to the thread for good.
            if (codes.Length > 1 << 26) t_codes = null;
            if (scales.Length > 1 << 22) t_scales = null;
            if (sums.Length > 1 << 22) t_codeSums = null;
        }
    }

    /// <summary>
    /// Blocks of 32 along K: q8's stored blocks; for nf4 the halves of its blocks of 64 that hold any of the K weights
    /// (a last half wholly in the zero padding is skipped, so no x block is empty).
    /// </summary>
    private static int KBlocks(QuantizedMatrix w) => (w.Cols + BlockSize - 1) / BlockSize;

    [ThreadStatic] private static byte[]? t_codes;
    [ThreadStatic] private static float[]? t_scales;
    [ThreadStatic] private static int[]? t_codeSums;
    [ThreadStatic] private static byte[]? t_staged;
    // The calling thread's item counter, which every thread of one call claims items from (a cache line of its own).
    [ThreadStatic] private static int[]? t_claims;
    private const int ClaimStride = 16;
    [ThreadStatic] private static float[]? t_sums;

    /// <summary>
    /// The quantized activations: codes [group][block][step][lane], scales [group][block][lane] and, for VNNI,
    /// -128 · Σ codes [group][block][lane] (the accumulators' starting values).
    /// </summary>
    private readonly struct QuantizedActivations(Layout layout, byte* codes, float* scales, int* corrections, int blocks)
    {
        public readonly Layout Layout = layout;
        public readonly int Blocks = blocks;
        public byte* Codes(int group, int block) => codes + ((long)group * Blocks + block) * Layout.GroupBlockBytes;
        public float* Scales(int group, int block) => scales + ((long)group * Blocks + block) * Layout.XLanes;
        public int* Corrections(int group, int block) => corrections + ((long)group * Blocks + block) * Layout.XLanes;
        public long GroupStride => (long)Blocks * Layout.GroupBlockBytes;
        public long ScaleGroupStride => (long)Blocks * Layout.XLanes;
    }

    /// <summary>Quantizes one group of XLanes x rows per item; rows past the real ones become zero codes with scale 0.</summary>
    private readonly struct QuantizeGroups(QuantizedActivations activations, float* x, int rows, int k) : IWorkItems
    {
        public void Run(int group)
        {
            Layout layout = activations.Layout;
            if (layout.Path == Path.Vector512)
            {
                QuantizeGroupInt16Vector512(group);
                return;
            }
            bool bytes = layout.CodeSize == 1;
            int lanes = layout.XLanes, blocks = activations.Blocks;
            // One block's codes in row order, then spread a 32-bit step at a time to the row's lane.
            uint* block = stackalloc uint[BlockSize * 2 / 4];
            float* padded = stackalloc float[BlockSize];
            for (int lane = 0; lane < lanes; lane++)
            {
                int m = group * lanes + lane;
                for (int b = 0; b < blocks; b++)
                {
                    float scale;
                    int codeSum = 0;
                    if (m < rows)
                    {
                        float* source = x + (long)m * k + b * BlockSize;
                        int count = Math.Min(BlockSize, k - b * BlockSize);
                        if (count < BlockSize)
                        {
                            new Span<float>(padded, BlockSize).Clear();
                            new ReadOnlySpan<float>(source, count).CopyTo(new Span<float>(padded, count));
                            source = padded;
                        }
                        scale = Vector256.IsHardwareAccelerated
                            ? QuantizeBlockVector256(source, (byte*)block, bytes, out codeSum)
                            : QuantizeBlockScalar(source, (byte*)block, bytes, out codeSum);
                    }
                    else
                        scale = ZeroBlock((byte*)block, bytes, 0f, out codeSum);
                    uint* target = (uint*)activations.Codes(group, b) + lane;
                    for (int step = 0; step < layout.Steps; step++)
                        target[step * lanes] = block[step];
                    activations.Scales(group, b)[lane] = scale;
                    activations.Corrections(group, b)[lane] = -128 * codeSum;
                }
            }
        }

        /// <summary>
        /// The AVX-512 int16 layout, 16 rows at a time: each row's block becomes one vector of 16 code pairs (in row
        /// order), and a 16 x 16 transpose of those vectors gives the [step][lane] layout in whole-vector stores
        /// (spreading one row at a time costs 16 scalar stores per row block).
        /// </summary>
        private void QuantizeGroupInt16Vector512(int group)
        {
            const int Lanes = 16;
            int blocks = activations.Blocks;
            Vector512<int>* rowsOfBlock = stackalloc Vector512<int>[Lanes];
            float* padded = stackalloc float[BlockSize];
            for (int b = 0; b < blocks; b++)
            {
                float* scales = activations.Scales(group, b);
                int count = Math.Min(BlockSize, k - b * BlockSize);
                for (int lane = 0; lane < Lanes; lane++)
                {
                    int m = group * Lanes + lane;
                    if (m >= rows)
                    {
                        rowsOfBlock[lane] = Vector512<int>.Zero;
                        scales[lane] = 0f;
                        continue;
                    }
                    float* source = x + (long)m * k + b * BlockSize;
                    if (count < BlockSize)
                    {
                        new Span<float>(padded, BlockSize).Clear();
                        new ReadOnlySpan<float>(source, count).CopyTo(new Span<float>(padded, count));
                        source = padded;
                    }
                    scales[lane] = QuantizeBlockInt16Vector512(source, out rowsOfBlock[lane]);
                }
                PackedGemm.Transpose16((float*)rowsOfBlock, Lanes, (float*)activations.Codes(group, b), Lanes);
            }
        }
    }

    /// <summary>
    /// As <see cref="QuantizeBlockVector256"/> for int16 codes on AVX-512: the 32 codes of one block as 16 code pairs
    /// (vpcvtps2dq rounds half to even, as Round does; the products are within ±L·(1 + ε), so no conversion saturates).
    /// </summary>
    [MethodImpl(MethodImplOptions.AggressiveInlining)]
    internal static float QuantizeBlockInt16Vector512(float* source, out Vector512<int> pairs)
    {
        Vector512<float> v0 = Vector512.Load(source), v1 = Vector512.Load(source + 16);
        float scale = BlockInverse(Vector512.MaxNative(Vector512.Abs(v0), Vector512.Abs(v1)), Vector512.IsFinite(v0) & Vector512.IsFinite(v1),
            short.MaxValue, out Vector512<float> inverse);
        pairs = Vector512.Create(ToInt16(v0 * inverse, short.MaxValue), ToInt16(v1 * inverse, short.MaxValue)).AsInt32();
        return scale;
    }

    /// <summary>A block's scale from its lanes' peaks, and the multiplier that turns its values into codes (0 for a zero or bad block).</summary>
    [MethodImpl(MethodImplOptions.AggressiveInlining)]
    internal static float BlockInverse(Vector512<float> peak, Vector512<float> finite, int limit, out Vector512<float> inverse)
    {
        float absMax = MaxLane(peak);
        bool allFinite = finite.AsInt32() == Vector512<int>.AllBitsSet;
        if (!allFinite || absMax < MinAbsMax)
        {
            inverse = Vector512<float>.Zero;
            return allFinite ? 0f : float.NaN;
        }
        inverse = Vector512.Create(limit / absMax);
        return absMax / limit;
    }

    [MethodImpl(MethodImplOptions.AggressiveInlining)]
    internal static float MaxLane(Vector512<float> v)
    {
        Vector256<float> half = Vector256.MaxNative(v.GetLower(), v.GetUpper());
        Vector128<float> quarter = Vector128.MaxNative(half.GetLower(), half.GetUpper());
        return MathF.Max(MathF.Max(quarter[0], quarter[1]), MathF.Max(quarter[2], quarter[3]));
    }

    /// <summary>16 scaled values rounded half to even (vcvtps2dq) and clamped to ±limit, as int16.</summary>
    [MethodImpl(MethodImplOptions.AggressiveInlining)]
    internal static Vector256<short> ToInt16(Vector512<float> scaled, int limit)
    {
        Vector512<int> bound = Vector512.Create(limit);
        return Avx512F.ConvertToVector256Int16(Vector512.Clamp(Avx512F.ConvertToVector512Int32(scaled), -bound, bound));
    }

    /// <summary>
    /// One block of 32 x values into codes in row order (VNNI: int8; otherwise int16) and returns its scale (and the
    /// codes' sum): scale = absmax/L, q = round-half-even(x · (L/absmax)) clamped to ±L; absmax below
    /// <see cref="MinAbsMax"/> gives zeros and scale 0, a NaN or infinity gives zeros and scale NaN (so the output is NaN,
    /// as the fp32 product would be).
    /// </summary>
    private static float QuantizeBlockVector256(float* source, byte* codes, bool bytes, out int codeSum)
    {
        Vector256<float> v0 = Vector256.Load(source), v1 = Vector256.Load(source + 8);
        Vector256<float> v2 = Vector256.Load(source + 16), v3 = Vector256.Load(source + 24);
        bool finite = (Vector256.IsFinite(v0) & Vector256.IsFinite(v1) & Vector256.IsFinite(v2) & Vector256.IsFinite(v3)).ExtractMostSignificantBits() == 0xFF;
        Vector256<float> peak = Vector256.MaxNative(Vector256.MaxNative(Vector256.Abs(v0), Vector256.Abs(v1)), Vector256.MaxNative(Vector256.Abs(v2), Vector256.Abs(v3)));
        Vector128<float> half = Vector128.MaxNative(peak.GetLower(), peak.GetUpper());
        float absMax = MathF.Max(MathF.Max(half[0], half[1]), MathF.Max(half[2], half[3]));
        if (!finite || absMax < MinAbsMax)
            return ZeroBlock(codes, bytes, finite ? 0f : float.NaN, out codeSum);

        int largest = bytes ? 127 : short.MaxValue;
        Vector256<float> inverse = Vector256.Create(largest / absMax);
        Vector256<int> limit = Vector256.Create(largest);
        Vector256<int> q0 = Vector256.Clamp(Vector256.ConvertToInt32(Vector256.Round(v0 * inverse)), -limit, limit);
        Vector256<int> q1 = Vector256.Clamp(Vector256.ConvertToInt32(Vector256.Round(v1 * inverse)), -limit, limit);
        Vector256<int> q2 = Vector256.Clamp(Vector256.ConvertToInt32(Vector256.Round(v2 * inverse)), -limit, limit);
        Vector256<int> q3 = Vector256.Clamp(Vector256.ConvertToInt32(Vector256.Round(v3 * inverse)), -limit, limit);
        codeSum = Vector256.Sum(q0 + q1 + q2 + q3);
        Vector256<short> low = Vector256.Narrow(q0, q1), high = Vector256.Narrow(q2, q3);
        if (bytes)
            Vector256.Narrow(low, high).Store((sbyte*)codes);
        else
        {
            low.Store((short*)codes);
            high.Store((short*)codes + 16);
        }
        return absMax / largest;
    }

    private static float QuantizeBlockScalar(float* source, byte* codes, bool bytes, out int codeSum)
    {
        float absMax = 0f;
        bool finite = true;
        for (int i = 0; i < BlockSize; i++)
        {
            finite &= float.IsFinite(source[i]);
            absMax = MathF.Max(absMax, MathF.Abs(source[i]));
        }
        if (!finite || absMax < MinAbsMax)
            return ZeroBlock(codes, bytes, finite ? 0f : float.NaN, out codeSum);
        int largest = bytes ? 127 : short.MaxValue;
        float inverse = largest / absMax;
        codeSum = 0;
        for (int i = 0; i < BlockSize; i++)
        {
            int q = Math.Clamp((int)MathF.Round(source[i] * inverse), -largest, largest);
            codeSum += q;
            if (bytes) ((sbyte*)codes)[i] = (sbyte)q;
            else ((short*)codes)[i] = (short)q;
        }
        return absMax / largest;
    }

    private static float ZeroBlock(byte* codes, bool bytes, float scale, out int codeSum)
    {
        new Span<byte>(codes, BlockSize * (bytes ? 1 : 2)).Clear();
        codeSum = 0;
        return scale;
    }

    /// <summary>
    /// The work items, each one range of W rows (at most TileRows) against one slice of the x rows. For each K chunk the
    /// W rows are staged (VNNI: codes offset by +128; otherwise widened codes; then scales; zero rows pad the range to
    /// whole micro-kernels), then every pair of x groups sweeps them. The fp32 sums are kept as [W row][x row] and
    /// transposed into y at the end. Each thread claims items from a shared counter, and claims its next one as the
    /// last chunk of the current one starts, so that the W rows of the next item's first chunk can be prefetched
    /// under that chunk's arithmetic (the W of a model's layer is read once per call, from memory).
    /// </summary>
    private readonly struct Tiles(QuantizedActivations activations, QuantizedMatrix w, int rows, int units, int slices, int wUnits, int ranges,
        int* next, float* bias, float* y, float softCap) : IWorkItems
    {
        private int Count => ranges * slices;

        /// <summary>One per thread: runs items until none are left (a thread that joins late may find none).</summary>
        public void Run(int thread)
        {
            int item = Interlocked.Increment(ref *next) - 1;
            while (item < Count)
                item = RunItem(item);
        }

        /// <summary>W rows [first, end) of range <paramref name="range"/>: an even share of the RangeAlignment units.</summary>
        private (int First, int End) RangeRows(int range)
        {
            int first = (int)((long)range * wUnits / ranges) * RangeAlignment;
            int end = (int)((long)(range + 1) * wUnits / ranges) * RangeAlignment;
            return (first, Math.Min(end, w.Rows));
        }

        /// <summary>Runs <paramref name="item"/> and returns the item this thread runs next (Count: none).</summary>
        private int RunItem(int item)
        {
            Layout layout = activations.Layout;
            int n = w.Rows, blocks = KBlocks(w);
            int range = item / slices, slice = item % slices;
            (int n0, int n1) = RangeRows(range);
            int tileRows = n1 - n0;
            int stagedRows = (tileRows + layout.WRows - 1) / layout.WRows * layout.WRows;
            int m0 = (int)((long)slice * units / slices) * layout.XRows;
            int m1 = (int)((long)(slice + 1) * units / slices) * layout.XRows;
            int width = m1 - m0;
            int chunk = Math.Min(ChunkBlocks, blocks);
            int rowBytes = chunk * BlockSize * layout.CodeSize;
            // Staged W: codes [row][chunk], then scales [row][chunk].
            int stagedBytes = stagedRows * (rowBytes + chunk * 4);
            byte[] staged = t_staged is { } p && p.Length >= stagedBytes ? p : (t_staged = GC.AllocateUninitializedArray<byte>(stagedBytes, pinned: true));
            int sumCount = stagedRows * width;
            float[] sums = t_sums is { } s && s.Length >= sumCount ? s : (t_sums = GC.AllocateUninitializedArray<float>(sumCount, pinned: true));
            int following = Count;
            fixed (byte* stagedPointer = staged)
            fixed (float* sumPointer = sums)
            {
                new Span<float>(sumPointer, sumCount).Clear();
                byte* wCodes = stagedPointer;
                float* wScales = (float*)(stagedPointer + stagedRows * rowBytes);
                for (int b0 = 0; b0 < blocks; b0 += chunk)
                {
                    int count = Math.Min(chunk, blocks - b0);
                    Stage(layout, w, n0, tileRows, stagedRows, b0, count, chunk, wCodes, wScales);
                    // The W rows staged next (this item's next chunk, else the first chunk of the item this thread
                    // claims now) are asked for a few rows before each micro-kernel call, so that they arrive from
                    // memory under the arithmetic. (Asking for the next x panel or for the y lines as well measured
                    // slower: the hardware prefetchers follow those streams.)
                    var prefetch = default(WeightPrefetch);
                    if (b0 + chunk < blocks)
                        prefetch = new WeightPrefetch(w, n0, tileRows, b0 + chunk, Math.Min(chunk, blocks - b0 - chunk));
                    else
                    {
                        following = Interlocked.Increment(ref *next) - 1;
                        if (following < Count && following / slices != range)
                        {
                            (int f0, int f1) = RangeRows(following / slices);
                            prefetch = new WeightPrefetch(w, f0, f1 - f0, 0, chunk);
                        }
                    }
                    int calls = (width / layout.XRows) * (stagedRows / layout.WRows);
                    int rowsPerCall = (prefetch.Rows + calls - 1) / calls;
                    int nextRow = 0;
                    for (int m = m0; m < m1; m += layout.XRows)
                    {
                        int group = m / layout.XLanes;
                        byte* xCodes = activations.Codes(group, b0);
                        float* xScales = activations.Scales(group, b0);
                        int* xCorrections = activations.Corrections(group, b0);
                        // A last pair whose second group holds only padding rows: one group (AVX-512).
                        bool oneGroup = layout.Path == Path.Vector512 && rows - m <= layout.XLanes;
                        for (int r = 0; r < stagedRows; r += layout.WRows)
                        {
                            float* target = sumPointer + (long)r * width + (m - m0);
                            var operands = new MicroOperands(xCodes, (nint)activations.GroupStride, xScales, xCorrections, (nint)activations.ScaleGroupStride,
                                wCodes + (long)r * rowBytes, rowBytes, wScales + r * chunk, chunk, count, target, width);
                            if (nextRow < prefetch.Rows)
                            {
                                prefetch.Issue(nextRow, rowsPerCall);
                                nextRow += rowsPerCall;
                            }
                            switch (layout.Path)
                            {
                                case Path.Vnni256: MicroVnni256(operands); break;
                                case Path.Vector512 when oneGroup: MicroInt16Vector512OneGroup(operands); break;
                                case Path.Vector512: MicroInt16Vector512(operands); break;
                                case Path.Vector256: MicroInt16<Int16Ops256, Vector256<int>>(operands); break;
                                default: MicroInt16<Int16Ops128, Vector128<int>>(operands); break;
                            }
                        }
                    }
                }

                // Transpose the sums into y with the bias, then apply the soft-cap to each finished row segment.
                int last = Math.Min(m1, rows);
                if (Avx512F.IsSupported)
                    StoreVector512(sumPointer, width, tileRows, last - m0, bias == null ? null : bias + n0, y + (long)m0 * n + n0, n);
                else
                {
                    Transpose(sumPointer, width, tileRows, last - m0, y + (long)m0 * n + n0, n);
                    if (bias != null)
                    {
                        for (int m = m0; m < last; m++)
                        {
                            var segment = new Span<float>(y + (long)m * n + n0, tileRows);
                            TensorPrimitives.Add(segment, new ReadOnlySpan<float>(bias + n0, tileRows), segment);
                        }
                    }
                }
                if (softCap > 0f)
                {
                    for (int m = m0; m < last; m++)
                    {
                        var segment = new Span<float>(y + (long)m * n + n0, tileRows);
                        Activations.SoftCap(segment, segment, softCap);
                    }
                }
            }
            // A very tall slice would otherwise pin its sums to the thread for good.
            if (sums.Length > 1 << 22) t_sums = null;
            return following;
        }
    }

    /// <summary>W rows [row, row + count), blocks of 32 [block, block + blocks): their codes and scales, a few rows at a time.</summary>
    private readonly struct WeightPrefetch(QuantizedMatrix? w, int row, int count, int block, int blocks)
    {
        public int Rows => w == null ? 0 : count;

        /// <summary>Asks for rows [first, first + rows) of this range to be brought into L2.</summary>
        public void Issue(int first, int rows)
        {
            if (w == null || !Sse.IsSupported)
                return;
            int end = Math.Min(count, first + rows);
            int scaleSize = w.ScaleType.SizeOf();
            // Stored blocks (32 code bytes each in both formats) covering the range: an nf4 block holds two blocks of 32.
            int halves = w.Format == QuantFormat.Nf4 ? 2 : 1;
            int stored = block / halves, storedEnd = (block + blocks + halves - 1) / halves;
            for (int r = first; r < end; r++)
            {
                long index = (long)(row + r) * w.BlocksPerRow + stored;
                byte* codes = w.Blocks + index * BlockSize;
                PackedGemm.PrefetchLines(codes, codes + (storedEnd - stored) * BlockSize);
                byte* scales = w.ScaleData + index * scaleSize;
                PackedGemm.PrefetchLines(scales, scales + (storedEnd - stored) * scaleSize);
            }
        }
    }

    /// <summary>
    /// Copies W rows n0..n0+count-1, K blocks b0..b0+blocks-1, into row-major staging rows of <paramref name="chunk"/>
    /// blocks (VNNI: offset by +128 to unsigned bytes; int16 paths: widened; nf4: looked up, see <see cref="StageNf4Row"/>),
    /// with their scales; rows count..stagedRows-1 hold zero weights.
    /// </summary>
    private static void Stage(in Layout layout, QuantizedMatrix w, int n0, int count, int stagedRows, int b0, int blocks, int chunk,
        byte* codes, float* scales)
    {
        int rowBytes = chunk * BlockSize * layout.CodeSize;
        bool bytes = layout.CodeSize == 1;
        int perRow = w.BlocksPerRow;
        for (int r = 0; r < stagedRows; r++)
        {
            byte* target = codes + (long)r * rowBytes;
            if (r >= count)
            {
                new Span<byte>(target, blocks * BlockSize * layout.CodeSize).Fill(bytes ? (byte)0x80 : (byte)0);
                new Span<float>(scales + r * chunk, blocks).Clear();
                continue;
            }
            if (w.Format == QuantFormat.Nf4)
            {
                StageNf4Row(layout.Path, w, n0 + r, b0, blocks, target, scales + r * chunk);
                continue;
            }
            long first = (long)(n0 + r) * perRow + b0;
            sbyte* source = (sbyte*)w.Blocks + first * BlockSize;
            // Straight from the matrix's storage (ReadScales' checks and span call cost as much as the widening here).
            if (w.ScaleType == DType.F16)
                QuantMatMul.WidenHalves((ushort*)w.ScaleData + first, scales + r * chunk, blocks);
            else
                new ReadOnlySpan<float>((float*)w.ScaleData + first, blocks).CopyTo(new Span<float>(scales + r * chunk, blocks));
            if (bytes)
                OffsetCopy(source, target, blocks * BlockSize);
            else
                Widen(source, (short*)target, blocks * BlockSize);
        }
    }

    /// <summary>
    /// One nf4 row, blocks of 32 b0..b0+blocks-1 (block 2j + h: the low (h = 0) or high (h = 1) nibbles of the 32 bytes of
    /// stored block j), as integer codes in element order and scales absmax · (1 / level) (<see cref="Nf4Level"/>).
    /// </summary>
    private static void StageNf4Row(Path path, QuantizedMatrix w, int row, int b0, int blocks, byte* codes, float* scales)
    {
        // The stored blocks covering the range: their scales widened once (fp16 ones 16 at a time), then one per block of 32.
        int stored = b0 / 2, storedCount = (b0 + blocks + 1) / 2 - stored;
        long firstScale = (long)row * w.BlocksPerRow + stored;
        float* absMax = stackalloc float[storedCount];
        if (w.ScaleType == DType.F16)
            QuantMatMul.WidenHalves((ushort*)w.ScaleData + firstScale, absMax, storedCount);
        else
            new ReadOnlySpan<float>((float*)w.ScaleData + firstScale, storedCount).CopyTo(new Span<float>(absMax, storedCount));
        float inverse = Nf4InverseLevel(path);
        for (int j = 0; j < blocks; j++)
            scales[j] = absMax[(b0 + j) / 2 - stored] * inverse;

        // Each stored block is loaded once for both of its halves (one only at a range end that splits it).
        byte* packed = w.Blocks + firstScale * BlockSize;
        int codeBytes = BlockSize * (path == Path.Vnni256 ? 1 : 2);
        int first = b0 & 1, end = b0 + blocks - 2 * stored;
        switch (path)
        {
            case Path.Vector512:
            {
                Vector512<short> table = Vector512.Create((ReadOnlySpan<short>)s_nf4Int16Codes);
                for (int s = 0; s < storedCount; s++, first = 0)
                    LookUpNf4Int16Vector512(table, packed + s * BlockSize, first, Math.Min(2, end - 2 * s), (short*)(codes + (2 * s + first - (b0 & 1)) * codeBytes));
                break;
            }
            case Path.Vnni256:
            {
                Vector256<byte> table = Vector256.Create((ReadOnlySpan<byte>)s_nf4OffsetBytes);
                for (int s = 0; s < storedCount; s++, first = 0)
                    LookUpNf4Bytes(table, packed + s * BlockSize, first, Math.Min(2, end - 2 * s), codes + (2 * s + first - (b0 & 1)) * codeBytes);
                break;
            }
            default:
            {
                Vector128<byte> lowBytes = Vector128.Create((ReadOnlySpan<byte>)s_nf4Int16Bytes);
                Vector128<byte> highBytes = Vector128.Create(((ReadOnlySpan<byte>)s_nf4Int16Bytes)[16..]);
                for (int s = 0; s < storedCount; s++, first = 0)
                    LookUpNf4Int16Vector128(lowBytes, highBytes, packed + s * BlockSize, first, Math.Min(2, end - 2 * s), (short*)(codes + (2 * s + first - (b0 & 1)) * codeBytes));
                break;
            }
        }
    }

    /// <summary>
    /// Halves [first, end) of one stored block (half h: bits 4h..4h+3 of its 32 bytes) as int16 codes, 32 per half:
    /// one zero-extension, then a shift and a vpermw per half.
    /// </summary>
    [MethodImpl(MethodImplOptions.AggressiveInlining)]
    private static void LookUpNf4Int16Vector512(Vector512<short> table, byte* packed, int first, int end, short* target)
    {
        Vector512<short> wide = Avx512BW.ConvertToVector512Int16(Vector256.Load(packed));
        // The low nibble needs no mask: bit 4 (the high nibble's lowest) picks the table's second, equal copy.
        if (first == 0)
            Avx512BW.PermuteVar32x16(table, wide).Store(target);
        if (end == 2)
            Avx512BW.PermuteVar32x16(table, Avx512BW.ShiftRightLogical(wide, 4)).Store(target + 32 * (1 - first));
    }

    /// <summary>
    /// As <see cref="LookUpNf4Int16Vector512"/> 16 bytes at a time: pshufb looks up the codes' low and high bytes, unpack
    /// joins them (FMA implies SSSE3).
    /// </summary>
    [MethodImpl(MethodImplOptions.AggressiveInlining)]
    private static void LookUpNf4Int16Vector128(Vector128<byte> lowBytes, Vector128<byte> highBytes, byte* packed, int first, int end, short* target)
    {
        Vector128<byte> mask = Vector128.Create((byte)0x0F);
        for (int quarter = 0; quarter < 2; quarter++)
        {
            Vector128<byte> bytes = Vector128.Load(packed + 16 * quarter);
            for (int half = first; half < end; half++)
            {
                // pshufb zeroes a byte whose index has bit 7 set: mask to the nibble.
                Vector128<byte> index = (half == 0 ? bytes : Sse2.ShiftRightLogical(bytes.AsUInt16(), 4).AsByte()) & mask;
                Vector128<byte> low = Ssse3.Shuffle(lowBytes, index), high = Ssse3.Shuffle(highBytes, index);
                short* halfTarget = target + 32 * (half - first) + 16 * quarter;
                Sse2.UnpackLow(low, high).AsInt16().Store(halfTarget);
                Sse2.UnpackHigh(low, high).AsInt16().Store(halfTarget + 8);
            }
        }
    }

    /// <summary>
    /// Halves [first, end) of one stored block as VNNI's offset bytes round(NF4 · 127) + 128: one pshufb per half (the
    /// table repeated in both 128-bit lanes).
    /// </summary>
    [MethodImpl(MethodImplOptions.AggressiveInlining)]
    private static void LookUpNf4Bytes(Vector256<byte> table, byte* packed, int first, int end, byte* target)
    {
        Vector256<byte> bytes = Vector256.Load(packed), mask = Vector256.Create((byte)0x0F);
        for (int half = first; half < end; half++)
        {
            Vector256<byte> index = (half == 0 ? bytes : Avx2.ShiftRightLogical(bytes.AsUInt16(), 4).AsByte()) & mask;
            Avx2.Shuffle(table, index).Store(target + 32 * (half - first));
        }
    }

    private static void Widen(sbyte* source, short* target, int count)
    {
        int i = 0;
        if (Avx512BW.IsSupported)
        {
            for (; i + 32 <= count; i += 32)
                Avx512BW.ConvertToVector512Int16(Vector256.Load(source + i)).Store(target + i);
        }
        if (Vector256.IsHardwareAccelerated)
        {
            for (; i + 32 <= count; i += 32)
            {
                (Vector256<short> low, Vector256<short> high) = Vector256.Widen(Vector256.Load(source + i));
                low.Store(target + i);
                high.Store(target + i + 16);
            }
        }
        for (; i < count; i++)
            target[i] = source[i];
    }

    /// <summary>target = source + 128 as unsigned bytes (flipping the sign bit).</summary>
    private static void OffsetCopy(sbyte* source, byte* target, int count)
    {
        int i = 0;
        if (Vector256.IsHardwareAccelerated)
        {
            for (; i + 32 <= count; i += 32)
                (Vector256.Load((byte*)source + i) ^ Vector256.Create((byte)0x80)).Store(target + i);
        }
        for (; i < count; i++)
            target[i] = (byte)(source[i] + 128);
    }

    /// <summary>
    /// y[m, r] = sums[r, m] + bias[r] for r &lt; <paramref name="columns"/> (W rows) and m &lt; <paramref name="rows"/>
    /// (x rows): 16 x 16 blocks transposed in registers (whole 64-byte lines of y), the edges one value at a time.
    /// </summary>
    private static void StoreVector512(float* sums, int sumStride, int columns, int rows, float* bias, float* y, int yStride)
    {
        int wholeRows = rows & ~15, wholeColumns = columns & ~15;
        for (int m = 0; m < wholeRows; m += 16)
            for (int r = 0; r < wholeColumns; r += 16)
                PackedGemm.Transpose16(sums + (long)r * sumStride + m, sumStride, y + (long)m * yStride + r, yStride,
                    bias == null ? Vector512<float>.Zero : Vector512.Load(bias + r));
        for (int m = 0; m < rows; m++)
        {
            int first = m < wholeRows ? wholeColumns : 0;
            for (int r = first; r < columns; r++)
                y[(long)m * yStride + r] = sums[(long)r * sumStride + m] + (bias == null ? 0f : bias[r]);
        }
    }

    /// <summary>
    /// y[m, r] = sums[r, m] for r &lt; <paramref name="columns"/> (W rows) and m &lt; <paramref name="rows"/> (x rows), in
    /// 8 x 8 blocks with AVX where whole blocks fit.
    /// </summary>
    private static void Transpose(float* sums, int sumStride, int columns, int rows, float* y, int yStride)
    {
        int wholeRows = Avx.IsSupported ? rows & ~7 : 0, wholeColumns = Avx.IsSupported ? columns & ~7 : 0;
        for (int m = 0; m < wholeRows; m += 8)
        {
            for (int r = 0; r < wholeColumns; r += 8)
            {
                float* s = sums + (long)r * sumStride + m;
                Vector256<float> r0 = Vector256.Load(s), r1 = Vector256.Load(s + sumStride), r2 = Vector256.Load(s + 2 * sumStride), r3 = Vector256.Load(s + 3 * sumStride);
                Vector256<float> r4 = Vector256.Load(s + 4 * sumStride), r5 = Vector256.Load(s + 5 * sumStride), r6 = Vector256.Load(s + 6 * sumStride), r7 = Vector256.Load(s + 7 * sumStride);
                Vector256<float> t0 = Avx.UnpackLow(r0, r1), t1 = Avx.UnpackHigh(r0, r1), t2 = Avx.UnpackLow(r2, r3), t3 = Avx.UnpackHigh(r2, r3);
                Vector256<float> t4 = Avx.UnpackLow(r4, r5), t5 = Avx.UnpackHigh(r4, r5), t6 = Avx.UnpackLow(r6, r7), t7 = Avx.UnpackHigh(r6, r7);
                Vector256<float> u0 = Avx.Shuffle(t0, t2, 0x44), u1 = Avx.Shuffle(t0, t2, 0xEE), u2 = Avx.Shuffle(t1, t3, 0x44), u3 = Avx.Shuffle(t1, t3, 0xEE);
                Vector256<float> u4 = Avx.Shuffle(t4, t6, 0x44), u5 = Avx.Shuffle(t4, t6, 0xEE), u6 = Avx.Shuffle(t5, t7, 0x44), u7 = Avx.Shuffle(t5, t7, 0xEE);
                float* d = y + (long)m * yStride + r;
                Avx.Permute2x128(u0, u4, 0x20).Store(d);
                Avx.Permute2x128(u1, u5, 0x20).Store(d + yStride);
                Avx.Permute2x128(u2, u6, 0x20).Store(d + 2 * yStride);
                Avx.Permute2x128(u3, u7, 0x20).Store(d + 3 * yStride);
                Avx.Permute2x128(u0, u4, 0x31).Store(d + 4 * yStride);
                Avx.Permute2x128(u1, u5, 0x31).Store(d + 5 * yStride);
                Avx.Permute2x128(u2, u6, 0x31).Store(d + 6 * yStride);
                Avx.Permute2x128(u3, u7, 0x31).Store(d + 7 * yStride);
            }
            for (int r = wholeColumns; r < columns; r++)
                for (int i = 0; i < 8; i++)
                    y[(long)(m + i) * yStride + r] = sums[(long)r * sumStride + m + i];
        }
        for (int m = wholeRows; m < rows; m++)
            for (int r = 0; r < columns; r++)
                y[(long)m * yStride + r] = sums[(long)r * sumStride + m];
    }

    /// <summary>
    /// The operands of one micro-kernel call: two x groups (the second at +XGroupStride; scales and VNNI corrections
    /// at +XScaleGroupStride) from block b0, WRows staged W rows (RowBytes apart; scales <see cref="Chunk"/> apart),
    /// Blocks blocks, and the fp32 sums [W row][x row] (SumStride apart) they add into.
    /// </summary>
    private readonly struct MicroOperands(byte* x, nint xGroupStride, float* xScales, int* xCorrections, nint xScaleGroupStride,
        byte* w, nint rowBytes, float* wScales, int chunk, int blocks, float* sums, nint sumStride)
    {
        public readonly byte* X = x;
        public readonly nint XGroupStride = xGroupStride;
        public readonly float* XScales = xScales;
        public readonly int* XCorrections = xCorrections;
        public readonly nint XScaleGroupStride = xScaleGroupStride;
        public readonly byte* W = w;
        public readonly nint RowBytes = rowBytes;
        public readonly float* WScales = wScales;
        public readonly int Chunk = chunk;
        public readonly int Blocks = blocks;
        public readonly float* Sums = sums;
        public readonly nint SumStride = sumStride;
    }

    /// <summary>16 x rows (two groups of 8 lanes) by 8 W rows: 16 int32 accumulators, VNNI on signed x and offset W bytes.</summary>
    private static void MicroVnni256(in MicroOperands o)
    {
        const int GroupBlockBytes = 8 * BlockSize;
        byte* xa = o.X, xb = o.X + o.XGroupStride;
        float* sa = o.XScales, sb = o.XScales + o.XScaleGroupStride;
        nint stride = o.RowBytes, sumStride = o.SumStride;
        int chunk = o.Chunk, blocks = o.Blocks;
        int* xc = o.XCorrections;
        nint xcStride = o.XScaleGroupStride;
        float* wScales = o.WScales, sums = o.Sums;
        byte* wCodes = o.W;
        for (int b = 0; b < blocks; b++)
        {
            // Each accumulator starts at -128·Σx of its x row's block, which cancels the +128 offset of the W bytes.
            Vector256<int> a0 = Vector256.Load(xc + b * 8), a1 = Vector256.Load(xc + xcStride + b * 8);
            Vector256<int> b0 = a0, b1 = a1, c0 = a0, c1 = a1, d0 = a0, d1 = a1, e0 = a0, e1 = a1, f0 = a0, f1 = a1, g0 = a0, g1 = a1, h0 = a0, h1 = a1;
            byte* x0 = xa + (nint)b * GroupBlockBytes, x1 = xb + (nint)b * GroupBlockBytes;
            byte* w = wCodes + (nint)b * BlockSize;
            for (int step = 0; step < BlockSize; step += 4)
            {
                Vector256<sbyte> u = Vector256.Load((sbyte*)x0 + 8 * step), v = Vector256.Load((sbyte*)x1 + 8 * step);
                byte* ws = w + step;
                Vector256<byte> t = Vector256.Create(*(int*)ws).AsByte();
                a0 = AvxVnni.MultiplyWideningAndAdd(a0, t, u); a1 = AvxVnni.MultiplyWideningAndAdd(a1, t, v);
                t = Vector256.Create(*(int*)(ws + stride)).AsByte();
                b0 = AvxVnni.MultiplyWideningAndAdd(b0, t, u); b1 = AvxVnni.MultiplyWideningAndAdd(b1, t, v);
                t = Vector256.Create(*(int*)(ws + 2 * stride)).AsByte();
                c0 = AvxVnni.MultiplyWideningAndAdd(c0, t, u); c1 = AvxVnni.MultiplyWideningAndAdd(c1, t, v);
                t = Vector256.Create(*(int*)(ws + 3 * stride)).AsByte();
                d0 = AvxVnni.MultiplyWideningAndAdd(d0, t, u); d1 = AvxVnni.MultiplyWideningAndAdd(d1, t, v);
                t = Vector256.Create(*(int*)(ws + 4 * stride)).AsByte();
                e0 = AvxVnni.MultiplyWideningAndAdd(e0, t, u); e1 = AvxVnni.MultiplyWideningAndAdd(e1, t, v);
                t = Vector256.Create(*(int*)(ws + 5 * stride)).AsByte();
                f0 = AvxVnni.MultiplyWideningAndAdd(f0, t, u); f1 = AvxVnni.MultiplyWideningAndAdd(f1, t, v);
                t = Vector256.Create(*(int*)(ws + 6 * stride)).AsByte();
                g0 = AvxVnni.MultiplyWideningAndAdd(g0, t, u); g1 = AvxVnni.MultiplyWideningAndAdd(g1, t, v);
                t = Vector256.Create(*(int*)(ws + 7 * stride)).AsByte();
                h0 = AvxVnni.MultiplyWideningAndAdd(h0, t, u); h1 = AvxVnni.MultiplyWideningAndAdd(h1, t, v);
            }
            Vector256<float> xs0 = Vector256.Load(sa + b * 8), xs1 = Vector256.Load(sb + b * 8);
            float* scale = wScales + b;
            float* row = sums;
            Accumulate(row, a0, a1, xs0, xs1, scale[0]); row += sumStride;
            Accumulate(row, b0, b1, xs0, xs1, scale[chunk]); row += sumStride;
            Accumulate(row, c0, c1, xs0, xs1, scale[2 * chunk]); row += sumStride;
            Accumulate(row, d0, d1, xs0, xs1, scale[3 * chunk]); row += sumStride;
            Accumulate(row, e0, e1, xs0, xs1, scale[4 * chunk]); row += sumStride;
            Accumulate(row, f0, f1, xs0, xs1, scale[5 * chunk]); row += sumStride;
            Accumulate(row, g0, g1, xs0, xs1, scale[6 * chunk]); row += sumStride;
            Accumulate(row, h0, h1, xs0, xs1, scale[7 * chunk]);
        }
    }

    /// <summary>sums[0..16) = fma(float(dots), xScales · wScale, sums) for the two x groups of one W row.</summary>
    [MethodImpl(MethodImplOptions.AggressiveInlining)]
    private static void Accumulate(float* row, Vector256<int> dots0, Vector256<int> dots1, Vector256<float> xScales0, Vector256<float> xScales1, float wScale)
    {
        Vector256<float> s = Vector256.Create(wScale);
        Fma.MultiplyAdd(Avx.ConvertToVector256Single(dots0), xScales0 * s, Vector256.Load(row)).Store(row);
        Fma.MultiplyAdd(Avx.ConvertToVector256Single(dots1), xScales1 * s, Vector256.Load(row + 8)).Store(row + 8);
    }

    /// <summary>32 x rows (two groups of 16 lanes) by 8 W rows: 16 int32 accumulators, int16 pairs on AVX-512BW.</summary>
    private static void MicroInt16Vector512(in MicroOperands o)
    {
        const int GroupBlockBytes = 16 * BlockSize * 2;
        byte* xa = o.X, xb = o.X + o.XGroupStride;
        float* sa = o.XScales, sb = o.XScales + o.XScaleGroupStride;
        nint stride = o.RowBytes, sumStride = o.SumStride;
        int chunk = o.Chunk, blocks = o.Blocks;
        float* wScales = o.WScales, sums = o.Sums;
        byte* wCodes = o.W;
        for (int b = 0; b < blocks; b++)
        {
            byte* x0 = xa + (nint)b * GroupBlockBytes, x1 = xb + (nint)b * GroupBlockBytes;
            byte* w = wCodes + (nint)b * BlockSize * 2;
            // The first step starts the accumulators (no zeroing, no add): 15 adds per 16 multiply-adds.
            Vector512<short> u0 = Vector512.Load((short*)x0), v0 = Vector512.Load((short*)x1);
            Vector512<short> t0 = Vector512.Create(*(int*)w).AsInt16();
            Vector512<int> a0 = Avx512BW.MultiplyAddAdjacent(u0, t0), a1 = Avx512BW.MultiplyAddAdjacent(v0, t0);
            t0 = Vector512.Create(*(int*)(w + stride)).AsInt16();
            Vector512<int> b0 = Avx512BW.MultiplyAddAdjacent(u0, t0), b1 = Avx512BW.MultiplyAddAdjacent(v0, t0);
            t0 = Vector512.Create(*(int*)(w + 2 * stride)).AsInt16();
            Vector512<int> c0 = Avx512BW.MultiplyAddAdjacent(u0, t0), c1 = Avx512BW.MultiplyAddAdjacent(v0, t0);
            t0 = Vector512.Create(*(int*)(w + 3 * stride)).AsInt16();
            Vector512<int> d0 = Avx512BW.MultiplyAddAdjacent(u0, t0), d1 = Avx512BW.MultiplyAddAdjacent(v0, t0);
            t0 = Vector512.Create(*(int*)(w + 4 * stride)).AsInt16();
            Vector512<int> e0 = Avx512BW.MultiplyAddAdjacent(u0, t0), e1 = Avx512BW.MultiplyAddAdjacent(v0, t0);
            t0 = Vector512.Create(*(int*)(w + 5 * stride)).AsInt16();
            Vector512<int> f0 = Avx512BW.MultiplyAddAdjacent(u0, t0), f1 = Avx512BW.MultiplyAddAdjacent(v0, t0);
            t0 = Vector512.Create(*(int*)(w + 6 * stride)).AsInt16();
            Vector512<int> g0 = Avx512BW.MultiplyAddAdjacent(u0, t0), g1 = Avx512BW.MultiplyAddAdjacent(v0, t0);
            t0 = Vector512.Create(*(int*)(w + 7 * stride)).AsInt16();
            Vector512<int> h0 = Avx512BW.MultiplyAddAdjacent(u0, t0), h1 = Avx512BW.MultiplyAddAdjacent(v0, t0);
            for (int step = 4; step < 2 * BlockSize; step += 4)
            {
                Vector512<short> u = Vector512.Load((short*)(x0 + 16 * step)), v = Vector512.Load((short*)(x1 + 16 * step));
                byte* ws = w + step;
                Vector512<short> t = Vector512.Create(*(int*)ws).AsInt16();
                a0 += Avx512BW.MultiplyAddAdjacent(u, t); a1 += Avx512BW.MultiplyAddAdjacent(v, t);
                t = Vector512.Create(*(int*)(ws + stride)).AsInt16();
                b0 += Avx512BW.MultiplyAddAdjacent(u, t); b1 += Avx512BW.MultiplyAddAdjacent(v, t);
                t = Vector512.Create(*(int*)(ws + 2 * stride)).AsInt16();
                c0 += Avx512BW.MultiplyAddAdjacent(u, t); c1 += Avx512BW.MultiplyAddAdjacent(v, t);
                t = Vector512.Create(*(int*)(ws + 3 * stride)).AsInt16();
                d0 += Avx512BW.MultiplyAddAdjacent(u, t); d1 += Avx512BW.MultiplyAddAdjacent(v, t);
                t = Vector512.Create(*(int*)(ws + 4 * stride)).AsInt16();
                e0 += Avx512BW.MultiplyAddAdjacent(u, t); e1 += Avx512BW.MultiplyAddAdjacent(v, t);
                t = Vector512.Create(*(int*)(ws + 5 * stride)).AsInt16();
                f0 += Avx512BW.MultiplyAddAdjacent(u, t); f1 += Avx512BW.MultiplyAddAdjacent(v, t);
                t = Vector512.Create(*(int*)(ws + 6 * stride)).AsInt16();
                g0 += Avx512BW.MultiplyAddAdjacent(u, t); g1 += Avx512BW.MultiplyAddAdjacent(v, t);
                t = Vector512.Create(*(int*)(ws + 7 * stride)).AsInt16();
                h0 += Avx512BW.MultiplyAddAdjacent(u, t); h1 += Avx512BW.MultiplyAddAdjacent(v, t);
            }
            Vector512<float> xs0 = Vector512.Load(sa + b * 16), xs1 = Vector512.Load(sb + b * 16);
            float* scale = wScales + b;
            float* row = sums;
            Accumulate(row, a0, a1, xs0, xs1, scale[0]); row += sumStride;
            Accumulate(row, b0, b1, xs0, xs1, scale[chunk]); row += sumStride;
            Accumulate(row, c0, c1, xs0, xs1, scale[2 * chunk]); row += sumStride;
            Accumulate(row, d0, d1, xs0, xs1, scale[3 * chunk]); row += sumStride;
            Accumulate(row, e0, e1, xs0, xs1, scale[4 * chunk]); row += sumStride;
            Accumulate(row, f0, f1, xs0, xs1, scale[5 * chunk]); row += sumStride;
            Accumulate(row, g0, g1, xs0, xs1, scale[6 * chunk]); row += sumStride;
            Accumulate(row, h0, h1, xs0, xs1, scale[7 * chunk]);
        }
    }

    /// <summary>
    /// 16 x rows (one group of 16 lanes) by 8 W rows: the last x rows when the second group of their pair would be
    /// padding only (a 261-token prompt pads to 288 rows in pairs, 272 in groups). The sums are the two-group
    /// kernel's for these rows, bit for bit: same integer dots, same fused multiply-add per block.
    /// </summary>
    private static void MicroInt16Vector512OneGroup(in MicroOperands o)
    {
        const int GroupBlockBytes = 16 * BlockSize * 2;
        byte* xa = o.X;
        float* sa = o.XScales;
        nint stride = o.RowBytes, sumStride = o.SumStride;
        int chunk = o.Chunk, blocks = o.Blocks;
        float* wScales = o.WScales, sums = o.Sums;
        byte* wCodes = o.W;
        for (int b = 0; b < blocks; b++)
        {
            byte* x0 = xa + (nint)b * GroupBlockBytes;
            byte* w = wCodes + (nint)b * BlockSize * 2;
            Vector512<short> u0 = Vector512.Load((short*)x0);
            Vector512<int> a = Avx512BW.MultiplyAddAdjacent(u0, Vector512.Create(*(int*)w).AsInt16());
            Vector512<int> c = Avx512BW.MultiplyAddAdjacent(u0, Vector512.Create(*(int*)(w + stride)).AsInt16());
            Vector512<int> d = Avx512BW.MultiplyAddAdjacent(u0, Vector512.Create(*(int*)(w + 2 * stride)).AsInt16());
            Vector512<int> e = Avx512BW.MultiplyAddAdjacent(u0, Vector512.Create(*(int*)(w + 3 * stride)).AsInt16());
            Vector512<int> f = Avx512BW.MultiplyAddAdjacent(u0, Vector512.Create(*(int*)(w + 4 * stride)).AsInt16());
            Vector512<int> g = Avx512BW.MultiplyAddAdjacent(u0, Vector512.Create(*(int*)(w + 5 * stride)).AsInt16());
            Vector512<int> h = Avx512BW.MultiplyAddAdjacent(u0, Vector512.Create(*(int*)(w + 6 * stride)).AsInt16());
            Vector512<int> k = Avx512BW.MultiplyAddAdjacent(u0, Vector512.Create(*(int*)(w + 7 * stride)).AsInt16());
            for (int step = 4; step < 2 * BlockSize; step += 4)
            {
                Vector512<short> u = Vector512.Load((short*)(x0 + 16 * step));
                byte* ws = w + step;
                a += Avx512BW.MultiplyAddAdjacent(u, Vector512.Create(*(int*)ws).AsInt16());
                c += Avx512BW.MultiplyAddAdjacent(u, Vector512.Create(*(int*)(ws + stride)).AsInt16());
                d += Avx512BW.MultiplyAddAdjacent(u, Vector512.Create(*(int*)(ws + 2 * stride)).AsInt16());
                e += Avx512BW.MultiplyAddAdjacent(u, Vector512.Create(*(int*)(ws + 3 * stride)).AsInt16());
                f += Avx512BW.MultiplyAddAdjacent(u, Vector512.Create(*(int*)(ws + 4 * stride)).AsInt16());
                g += Avx512BW.MultiplyAddAdjacent(u, Vector512.Create(*(int*)(ws + 5 * stride)).AsInt16());
                h += Avx512BW.MultiplyAddAdjacent(u, Vector512.Create(*(int*)(ws + 6 * stride)).AsInt16());
                k += Avx512BW.MultiplyAddAdjacent(u, Vector512.Create(*(int*)(ws + 7 * stride)).AsInt16());
            }
            Vector512<float> xs = Vector512.Load(sa + b * 16);
            float* scale = wScales + b;
            float* row = sums;
            Accumulate(row, a, xs, scale[0]); row += sumStride;
            Accumulate(row, c, xs, scale[chunk]); row += sumStride;
            Accumulate(row, d, xs, scale[2 * chunk]); row += sumStride;
            Accumulate(row, e, xs, scale[3 * chunk]); row += sumStride;
            Accumulate(row, f, xs, scale[4 * chunk]); row += sumStride;
            Accumulate(row, g, xs, scale[5 * chunk]); row += sumStride;
            Accumulate(row, h, xs, scale[6 * chunk]); row += sumStride;
            Accumulate(row, k, xs, scale[7 * chunk]);
        }
    }

    /// <summary>sums[0..16) = fma(float(dots), xScales · wScale, sums) for one x group of one W row.</summary>
    [MethodImpl(MethodImplOptions.AggressiveInlining)]
    private static void Accumulate(float* row, Vector512<int> dots, Vector512<float> xScales, float wScale) =>
        Vector512.FusedMultiplyAdd(Avx512F.ConvertToVector512Single(dots), xScales * Vector512.Create(wScale), Vector512.Load(row)).Store(row);

    [MethodImpl(MethodImplOptions.AggressiveInlining)]
    private static void Accumulate(float* row, Vector512<int> dots0, Vector512<int> dots1, Vector512<float> xScales0, Vector512<float> xScales1, float wScale)
    {
        Vector512<float> s = Vector512.Create(wScale);
        Vector512.FusedMultiplyAdd(Avx512F.ConvertToVector512Single(dots0), xScales0 * s, Vector512.Load(row)).Store(row);
        Vector512.FusedMultiplyAdd(Avx512F.ConvertToVector512Single(dots1), xScales1 * s, Vector512.Load(row + 16)).Store(row + 16);
    }

    /// <summary>The int16 multiply-add of one vector width (AVX2 or SSE2; 16 registers): x rows per vector = int32 lanes.</summary>
    private interface IInt16Ops<TVector> where TVector : unmanaged
    {
        static abstract int Lanes { get; }
        static abstract TVector Load(byte* source);
        /// <summary>One 32-bit word (two int16 W codes) in every lane.</summary>
        static abstract TVector BroadcastPair(byte* source);
        /// <summary>acc + (x pairs · w pairs summed per lane).</summary>
        static abstract TVector MultiplyAddPairs(TVector acc, TVector x, TVector w);
        /// <summary>sums[0..Lanes) = fma(float(dots), xScales[0..Lanes) · wScale, sums).</summary>
        static abstract void Accumulate(float* sums, TVector dots, float* xScales, float wScale);
    }

    private readonly struct Int16Ops256 : IInt16Ops<Vector256<int>>
    {
        public static int Lanes => 8;
        public static Vector256<int> Load(byte* source) => Vector256.Load((int*)source);
        public static Vector256<int> BroadcastPair(byte* source) => Vector256.Create(*(int*)source);
        public static Vector256<int> MultiplyAddPairs(Vector256<int> acc, Vector256<int> x, Vector256<int> w) => Avx2.Add(acc, Avx2.MultiplyAddAdjacent(x.AsInt16(), w.AsInt16()));
        public static void Accumulate(float* sums, Vector256<int> dots, float* xScales, float wScale) =>
            Fma.MultiplyAdd(Avx.ConvertToVector256Single(dots), Vector256.Load(xScales) * Vector256.Create(wScale), Vector256.Load(sums)).Store(sums);
    }

    private readonly struct Int16Ops128 : IInt16Ops<Vector128<int>>
    {
        public static int Lanes => 4;
        public static Vector128<int> Load(byte* source) => Vector128.Load((int*)source);
        public static Vector128<int> BroadcastPair(byte* source) => Vector128.Create(*(int*)source);
        public static Vector128<int> MultiplyAddPairs(Vector128<int> acc, Vector128<int> x, Vector128<int> w) => Sse2.Add(acc, Sse2.MultiplyAddAdjacent(x.AsInt16(), w.AsInt16()));
        public static void Accumulate(float* sums, Vector128<int> dots, float* xScales, float wScale) =>
            Fma.MultiplyAdd(Sse2.ConvertToVector128Single(dots), Vector128.Load(xScales) * Vector128.Create(wScale), Vector128.Load(sums)).Store(sums);
    }

    /// <summary>2·Lanes x rows (two groups) by 4 W rows: 8 int32 accumulators, int16 pairs on AVX2 or SSE2.</summary>
    private static void MicroInt16<TOps, TVector>(in MicroOperands o)
        where TOps : struct, IInt16Ops<TVector>
        where TVector : unmanaged
    {
        int lanes = TOps.Lanes;
        int groupBlockBytes = lanes * BlockSize * 2;
        byte* xa = o.X, xb = o.X + o.XGroupStride;
        float* sa = o.XScales, sb = o.XScales + o.XScaleGroupStride;
        nint stride = o.RowBytes, sumStride = o.SumStride;
        int chunk = o.Chunk, blocks = o.Blocks;
        float* wScales = o.WScales, sums = o.Sums;
        byte* wCodes = o.W;
        for (int b = 0; b < blocks; b++)
        {
            TVector a0 = default, a1 = default, b0 = default, b1 = default, c0 = default, c1 = default, d0 = default, d1 = default;
            byte* x0 = xa + (nint)b * groupBlockBytes, x1 = xb + (nint)b * groupBlockBytes;
            byte* w = wCodes + (nint)b * BlockSize * 2;
            for (int step = 0; step < 2 * BlockSize; step += 4)
            {
                TVector u = TOps.Load(x0 + lanes * step), v = TOps.Load(x1 + lanes * step);
                byte* ws = w + step;
                TVector t = TOps.BroadcastPair(ws);
                a0 = TOps.MultiplyAddPairs(a0, u, t); a1 = TOps.MultiplyAddPairs(a1, v, t);
                t = TOps.BroadcastPair(ws + stride);
                b0 = TOps.MultiplyAddPairs(b0, u, t); b1 = TOps.MultiplyAddPairs(b1, v, t);
                t = TOps.BroadcastPair(ws + 2 * stride);
                c0 = TOps.MultiplyAddPairs(c0, u, t); c1 = TOps.MultiplyAddPairs(c1, v, t);
                t = TOps.BroadcastPair(ws + 3 * stride);
                d0 = TOps.MultiplyAddPairs(d0, u, t); d1 = TOps.MultiplyAddPairs(d1, v, t);
            }
            float* xs0 = sa + b * lanes, xs1 = sb + b * lanes;
            float* scale = wScales + b;
            float* row = sums;
            TOps.Accumulate(row, a0, xs0, scale[0]); TOps.Accumulate(row + lanes, a1, xs1, scale[0]); row += sumStride;
            TOps.Accumulate(row, b0, xs0, scale[chunk]); TOps.Accumulate(row + lanes, b1, xs1, scale[chunk]); row += sumStride;
            TOps.Accumulate(row, c0, xs0, scale[2 * chunk]); TOps.Accumulate(row + lanes, c1, xs1, scale[2 * chunk]); row += sumStride;
            TOps.Accumulate(row, d0, xs0, scale[3 * chunk]); TOps.Accumulate(row + lanes, d1, xs1, scale[3 * chunk]);
        }
    }
}
