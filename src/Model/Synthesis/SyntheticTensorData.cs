using System.Buffers.Binary;
using System.Runtime.CompilerServices;
using System.Runtime.InteropServices;
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
/// z is the Irwin–Hall sum of four 16-bit uniforms, centred and scaled to unit variance: one 64-bit draw per element,
/// no transcendental functions, bell-shaped with tails cut at ±√12 ≈ 3.46σ (enough for weights whose only job is to
/// look and cost like real ones).
/// </remarks>
public static class SyntheticTensorData
{
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

        var rng = new Xoshiro256StarStar(seed, nameKey, (ulong)chunkIndex);
        float scale = init.Std * IrwinHallInverseStd, mean = init.Mean;
        switch (dtype)
        {
            case DType.F32:
            {
                var values = MemoryMarshal.Cast<byte, float>(destination);
                for (int i = 0; i < values.Length; i++) values[i] = Draw(ref rng, mean, scale);
                if (!BitConverter.IsLittleEndian) ReverseEndianness(destination, 4);
                break;
            }
            case DType.BF16:
            {
                var values = MemoryMarshal.Cast<byte, ushort>(destination);
                for (int i = 0; i < values.Length; i++) values[i] = ToBFloat16(Draw(ref rng, mean, scale));
                if (!BitConverter.IsLittleEndian) ReverseEndianness(destination, 2);
                break;
            }
            default:
            {
                var values = MemoryMarshal.Cast<byte, Half>(destination);
                for (int i = 0; i < values.Length; i++) values[i] = (Half)Draw(ref rng, mean, scale);
                if (!BitConverter.IsLittleEndian) ReverseEndianness(destination, 2);
                break;
            }
        }
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
        int chunksPerBatch = (int)Math.Min(chunks, Math.Max(8, 4 * Environment.ProcessorCount));
        int batchBytes = chunksPerBatch * ChunkElements * size;
        byte[] filling = new byte[batchBytes], writing = new byte[batchBytes];
        Task pending = Task.CompletedTask;
        var options = new ParallelOptions { CancellationToken = cancellationToken };

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

    [MethodImpl(MethodImplOptions.AggressiveInlining)]
    private static float Draw(ref Xoshiro256StarStar rng, float mean, float scale)
    {
        ulong r = rng.Next();
        uint lo = (uint)r, hi = (uint)(r >> 32);
        int sum = (int)(lo & 0xFFFF) + (int)(lo >> 16) + (int)(hi & 0xFFFF) + (int)(hi >> 16);
        return mean + (sum - IrwinHallMean) * scale;
    }

    /// <summary>fp32 → bf16 with round-to-nearest-even (the values here are always finite).</summary>
    [MethodImpl(MethodImplOptions.AggressiveInlining)]
    private static ushort ToBFloat16(float value)
    {
        uint bits = BitConverter.SingleToUInt32Bits(value);
        return (ushort)((bits + 0x7FFFu + ((bits >> 16) & 1u)) >> 16);
    }

    private static void ReverseEndianness(Span<byte> data, int elementSize)
    {
        if (elementSize == 2) BinaryPrimitives.ReverseEndianness(MemoryMarshal.Cast<byte, ushort>(data), MemoryMarshal.Cast<byte, ushort>(data));
        else BinaryPrimitives.ReverseEndianness(MemoryMarshal.Cast<byte, uint>(data), MemoryMarshal.Cast<byte, uint>(data));
    }

    /// <summary>xoshiro256** (Blackman and Vigna), its state filled by SplitMix64 from the three keys.</summary>
    private struct Xoshiro256StarStar
    {
        private ulong _s0, _s1, _s2, _s3;

        public Xoshiro256StarStar(ulong seed, ulong nameKey, ulong chunk)
        {
            ulong x = seed;
            x = SplitMix(ref x) ^ nameKey;
            x = SplitMix(ref x) ^ chunk;
            _s0 = SplitMix(ref x);
            _s1 = SplitMix(ref x);
            _s2 = SplitMix(ref x);
            _s3 = SplitMix(ref x);
        }

        [MethodImpl(MethodImplOptions.AggressiveInlining)]
        public ulong Next()
        {
            ulong result = ulong.RotateLeft(_s1 * 5, 7) * 9;
            ulong t = _s1 << 17;
            _s2 ^= _s0;
            _s3 ^= _s1;
            _s1 ^= _s2;
            _s0 ^= _s3;
            _s2 ^= t;
            _s3 = ulong.RotateLeft(_s3, 45);
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
