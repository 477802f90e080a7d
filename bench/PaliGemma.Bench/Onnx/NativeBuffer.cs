using System.Runtime.InteropServices;

namespace PaliGemma.Bench.Onnx;

/// <summary>A 64-byte aligned native float buffer: never moved by the GC, so ORT and our kernels can share it.</summary>
internal sealed unsafe class NativeBuffer : IDisposable
{
    public NativeBuffer(long length)
    {
        ArgumentOutOfRangeException.ThrowIfNegativeOrZero(length);
        Length = length;
        Pointer = (float*)NativeMemory.AlignedAlloc((nuint)(length * sizeof(float)), 64);
    }

    public float* Pointer { get; private set; }
    public long Length { get; }

    public Span<float> Span => new(Pointer, checked((int)Length));

    /// <summary>Fills with uniform values in [-scale, scale) from a fixed-seed xorshift generator (fast enough for gigabytes).</summary>
    public NativeBuffer FillUniform(ulong seed, float scale)
    {
        ulong state = seed * 0x9E3779B97F4A7C15UL | 1;
        float* p = Pointer;
        for (long i = 0; i < Length; i++)
        {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            // 24 random bits -> [0, 1) -> [-scale, scale)
            p[i] = ((state >> 40) * (1f / (1 << 24)) * 2f - 1f) * scale;
        }
        return this;
    }

    public void Dispose()
    {
        if (Pointer != null)
        {
            NativeMemory.AlignedFree(Pointer);
            Pointer = null;
        }
    }
}
