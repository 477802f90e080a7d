using System.Buffers;
using System.Buffers.Binary;
using System.Numerics.Tensors;
using System.Runtime.CompilerServices;
using System.Runtime.InteropServices;
using System.Runtime.Intrinsics;
using System.Text;
using PaliGemma.CpuOnly.Tensors;

namespace PaliGemma.CpuOnly.Model.Synthesis;

/// <summary>How a synthetic tensor's values are drawn: <c>Mean + Std · z</c> with z approximately standard normal.</summary>
public readonly record struct TensorInit(float Mean, float Std)
{
    /// <summary>N(0, 1/√fanIn): keeps activations at unit scale through a dense layer.</summary>
    public static TensorInit FanIn(long fanIn) => new(0f, 1f / MathF.Sqrt(fanIn));
}

/// <summary>One tensor of a synthetic checkpoint: its name, shape and value distribution.</summary>
public sealed record SyntheticTensor(string Name, long[] Shape, TensorInit Init)
{
    public long ElementCount
    {
        get
        {
            long count = 1;
            foreach (long dim in Shape) count = checked(count * dim);
            return count;
        }
    }

    public long ByteLength(DType dtype) => checked(ElementCount * dtype.SizeOf());
}

/// <summary>
/// Deterministic random tensor contents. Elements are generated in fixed chunks of <see cref="ChunkElements"/>; each
/// chunk has its own xoshiro256** stream keyed by (seed, tensor name, chunk index), so chunks can be made in any order
/// on any number of threads and the bytes only depend on the seed, the name, the distribution and the dtype.
/// </summary>
/// <remarks>
/// z is the Irwin–Hall sum of four 16-bit uniforms, centred and scaled to unit variance: 64 random bits per element,
/// drawn eight at a time from four xoshiro256** lanes, no transcendental functions, bell-shaped with tails cut at ±√12 ≈ 3.46σ (enough for weights whose only job is to
/// look and cost like real ones).
/// </remarks>
public static class SyntheticTensorData
{
    // Elements drawn in fp32 at a time before rounding to a 16-bit dtype (16 KB of stack).
    private const int BlockElements = 4096;

    /// <summary>Elements per independently seeded chunk (part of the output format: changing it changes every byte).</summary>
    public const int ChunkElements = 1 << 18;

    // Four discrete uniforms on 0..65535: mean 4·32767.5, variance 4·(65536² − 1)/12.
    private const float IrwinHallMean = 131070f;
    private static readonly float IrwinHallInverseStd = (float)(1.0 / Math.Sqrt((65536.0 * 65536.0 - 1.0) / 3.0));

    /// <summary>Number of chunks of a tensor with <paramref name="elementCount"/> elements.</summary>
    public static long ChunkCount(long elementCount) => (elementCount + ChunkElements - 1) / ChunkElements;

    /// <summary>64-bit FNV-1a of the UTF-8 name: a stable (process- and platform-independent) key for the tensor's streams.</summary>
    public static ulong NameKey(string name)
    {
        ArgumentNullException.ThrowIfNull(name);
        ulong hash = 14695981039346656037UL;
        byte[] utf8 = Encoding.UTF8.GetBytes(name);
        foreach (byte b in utf8) hash = (hash ^ b) * 1099511628211UL;
        return hash;
    }

    /// <summary>
    /// Writes chunk <paramref name="chunkIndex"/> of a tensor of <paramref name="elementCount"/> elements as raw
    /// little-endian <paramref name="dtype"/> values into <paramref name="destination"/>, which must hold exactly the chunk
    /// (<see cref="ChunkElements"/> elements, fewer for the last chunk).
    /// </summary>
    public static void FillChunk(ulong seed, ulong nameKey, long chunkIndex, long elementCount, TensorInit init, DType dtype, Span<byte> destination)
    {
        long chunks = ChunkCount(elementCount);
        if ((ulong)chunkIndex >= (ulong)chunks)
            throw new ArgumentOutOfRangeException(nameof(chunkIndex), chunkIndex, $"a tensor of {elementCount} elements has {chunks} chunks");
        int count = (int)Math.Min(ChunkElements, elementCount - chunkIndex * ChunkElements);
        int size = dtype switch
        {
            DType.F32 or DType.BF16 or DType.F16 => dtype.SizeOf(),
            _ => throw new ArgumentException($"synthetic tensors are floating point (F32, BF16, F16), not {dtype}", nameof(dtype)),
        };
        if (destination.Length != count * size)
            throw new ArgumentException($"chunk {chunkIndex} holds {count} {dtype} elements ({count * size} bytes), the destination {destination.Length}", nameof(destination));

        var rng = new Xoshiro256StarStarX4(seed, nameKey, (ulong)chunkIndex);
        var mean = Vector256.Create(init.Mean);
        var scale = Vector256.Create(init.Std * IrwinHallInverseStd);
        if (dtype == DType.F32)
        {
            Generate(ref rng, mean, scale, MemoryMarshal.Cast<byte, float>(destination));
        }
        else
        {
            // 16-bit outputs: draw a block in fp32, then round it.
            Span<float> block = stackalloc float[BlockElements];
            for (int start = 0; start < count; start += BlockElements)
            {
                int n = Math.Min(BlockElements, count - start);
                Generate(ref rng, mean, scale, block[..n]);
                if (dtype == DType.BF16) ToBFloat16(block[..n], MemoryMarshal.Cast<byte, ushort>(destination.Slice(start * 2, n * 2)));
                else TensorPrimitives.ConvertToHalf(block[..n], MemoryMarshal.Cast<byte, Half>(destination.Slice(start * 2, n * 2)));
            }
        }
        if (!BitConverter.IsLittleEndian) ReverseEndianness(destination, size);
    }

    /// <summary>
    /// Streams a whole tensor to <paramref name="output"/>: chunks are generated in parallel, a batch at a time, while the
    /// previous batch is being written. <paramref name="onWritten"/> receives the byte count of each completed write.
    /// </summary>
    public static void WriteTensor(Stream output, ulong seed, SyntheticTensor tensor, DType dtype, Action<long>? onWritten = null,
        CancellationToken cancellationToken = default)
    {
        ArgumentNullException.ThrowIfNull(output);
        ArgumentNullException.ThrowIfNull(tensor);
        long elements = tensor.ElementCount, chunks = ChunkCount(elements);
        if (chunks == 0) return;
        ulong key = NameKey(tensor.Name);
        int size = dtype.SizeOf();
        // Batches of at least 32 MB (large sequential writes) and several chunks per core (even load across threads).
        int minimumChunks = Math.Max(4 * Environment.ProcessorCount, (32 << 20) / (ChunkElements * size));
        int chunksPerBatch = (int)Math.Min(chunks, minimumChunks);
        int batchBytes = chunksPerBatch * ChunkElements * size;
        // Pooled: fresh 32 MB arrays per tensor would cost more in page faults and zeroing than generating the data.
        byte[] filling = ArrayPool<byte>.Shared.Rent(batchBytes), writing = ArrayPool<byte>.Shared.Rent(batchBytes);
        Task pending = Task.CompletedTask;
        var options = new ParallelOptions { CancellationToken = cancellationToken };
        try
        {
            for (long first = 0; first < chunks; first += chunksPerBatch)
            {
                int inBatch = (int)Math.Min(chunksPerBatch, chunks - first);
                long batchElements = Math.Min((long)inBatch * ChunkElements, elements - first * ChunkElements);
                byte[] buffer = filling;
                long firstChunk = first;
                Parallel.For(0, inBatch, options, c =>
                {
                    long chunk = firstChunk + c;
                    long chunkElements = Math.Min(ChunkElements, elements - chunk * ChunkElements);
                    FillChunk(seed, key, chunk, elements, tensor.Init, dtype, buffer.AsSpan(c * ChunkElements * size, (int)chunkElements * size));
                });

                pending.GetAwaiter().GetResult();
                int length = (int)(batchElements * size);
                pending = Task.Run(() =>
                {
                    output.Write(buffer, 0, length);
                    onWritten?.Invoke(length);
                }, cancellationToken);
                (filling, writing) = (writing, filling);
            }
            pending.GetAwaiter().GetResult();
        }
        finally
        {
            // On failure the last write may still be running: let it end before the caller closes the stream.
            if (!pending.IsCompleted) ((IAsyncResult)pending).AsyncWaitHandle.WaitOne();
            ArrayPool<byte>.Shared.Return(filling);
            ArrayPool<byte>.Shared.Return(writing);
        }
    }

    /// <summary>
    /// Fills <paramref name="destination"/> with mean + scale · (Irwin–Hall sum − its mean), 8 values per pair of draws.
    /// Only lane-wise integer and IEEE single operations, so every machine (any vector width or none) gives the same bits.
    /// </summary>
    private static void Generate(ref Xoshiro256StarStarX4 rng, Vector256<float> mean, Vector256<float> scale, Span<float> destination)
    {
        // The generator state lives in locals (registers) for the loop; the struct is only read and written back.
        var (s0, s1, s2, s3) = rng.State;
        var low16 = Vector256.Create(0xFFFFu);
        var center = Vector256.Create(IrwinHallMean);
        ref float output = ref MemoryMarshal.GetReference(destination);
        int length = destination.Length, i = 0;
        Span<float> tail = stackalloc float[8];
        while (i < length)
        {
            var a = Xoshiro256StarStarX4.Step(ref s0, ref s1, ref s2, ref s3).AsUInt32();
            var b = Xoshiro256StarStarX4.Step(ref s0, ref s1, ref s2, ref s3).AsUInt32();
            var sum = (a & low16) + (a >>> 16) + (b & low16) + (b >>> 16);   // four 16-bit uniforms per lane
            var values = mean + (Vector256.ConvertToSingle(sum.AsInt32()) - center) * scale;
            if (i <= length - 8)
            {
                values.StoreUnsafe(ref output, (nuint)i);
            }
            else
            {
                values.CopyTo(tail);
                tail[..(length - i)].CopyTo(destination[i..]);
            }
            i += 8;
        }
        rng.State = (s0, s1, s2, s3);
    }

    /// <summary>
    /// fp32 → bf16 with round-to-nearest-even, as torch's <c>.to(torch.bfloat16)</c> for finite values (and quiet NaNs
    /// without a full payload); also used to store LoRA-merged bf16 weights.
    /// </summary>
    internal static void ToBFloat16(ReadOnlySpan<float> source, Span<ushort> destination)
    {
        var one = Vector256.Create(1u);
        var bias = Vector256.Create(0x7FFFu);
        int i = 0;
        for (; i <= source.Length - 16; i += 16)
        {
            var lo = Vector256.LoadUnsafe(ref MemoryMarshal.GetReference(source), (nuint)i).AsUInt32();
            var hi = Vector256.LoadUnsafe(ref MemoryMarshal.GetReference(source), (nuint)i + 8).AsUInt32();
            lo = (lo + bias + ((lo >>> 16) & one)) >>> 16;
            hi = (hi + bias + ((hi >>> 16) & one)) >>> 16;
            Vector256.Narrow(lo, hi).StoreUnsafe(ref MemoryMarshal.GetReference(destination), (nuint)i);
        }
        for (; i < source.Length; i++)
        {
            uint bits = BitConverter.SingleToUInt32Bits(source[i]);
            destination[i] = (ushort)((bits + 0x7FFFu + ((bits >> 16) & 1u)) >> 16);
        }
    }

    private static void ReverseEndianness(Span<byte> data, int elementSize)
    {
        if (elementSize == 2) BinaryPrimitives.ReverseEndianness(MemoryMarshal.Cast<byte, ushort>(data), MemoryMarshal.Cast<byte, ushort>(data));
        else BinaryPrimitives.ReverseEndianness(MemoryMarshal.Cast<byte, uint>(data), MemoryMarshal.Cast<byte, uint>(data));
    }

    /// <summary>
    /// Four independent xoshiro256** generators (Blackman and Vigna) in the lanes of 256-bit vectors, their states filled
    /// by SplitMix64 from the three keys.
    /// </summary>
    private struct Xoshiro256StarStarX4
    {
        private Vector256<ulong> _s0, _s1, _s2, _s3;

        public Xoshiro256StarStarX4(ulong seed, ulong nameKey, ulong chunk)
        {
            ulong x = seed;
            x = SplitMix(ref x) ^ nameKey;
            x = SplitMix(ref x) ^ chunk;
            Span<ulong> state = stackalloc ulong[16];
            foreach (ref ulong word in state) word = SplitMix(ref x);
            _s0 = Vector256.Create(state[0], state[4], state[8], state[12]);
            _s1 = Vector256.Create(state[1], state[5], state[9], state[13]);
            _s2 = Vector256.Create(state[2], state[6], state[10], state[14]);
            _s3 = Vector256.Create(state[3], state[7], state[11], state[15]);
        }

        public (Vector256<ulong>, Vector256<ulong>, Vector256<ulong>, Vector256<ulong>) State
        {
            readonly get => (_s0, _s1, _s2, _s3);
            set => (_s0, _s1, _s2, _s3) = value;
        }

        /// <summary>One step of all four generators: returns their outputs and advances the state.</summary>
        [MethodImpl(MethodImplOptions.AggressiveInlining)]
        public static Vector256<ulong> Step(ref Vector256<ulong> s0, ref Vector256<ulong> s1, ref Vector256<ulong> s2, ref Vector256<ulong> s3)
        {
            var times5 = (s1 << 2) + s1;
            var rotated = (times5 << 7) | (times5 >>> 57);
            var result = (rotated << 3) + rotated;   // · 9
            var t = s1 << 17;
            s2 ^= s0;
            s3 ^= s1;
            s1 ^= s2;
            s0 ^= s3;
            s2 ^= t;
            s3 = (s3 << 45) | (s3 >>> 19);
            return result;
        }

        private static ulong SplitMix(ref ulong state)
        {
            ulong z = state += 0x9E3779B97F4A7C15UL;
            z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9UL;
            z = (z ^ (z >> 27)) * 0x94D049BB133111EBUL;
            return z ^ (z >> 31);
        }
    }
}
