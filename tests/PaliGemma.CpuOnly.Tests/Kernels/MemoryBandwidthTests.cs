using FsCheck;
using FsCheck.Fluent;
using FsCheck.Xunit;
using PaliGemma.CpuOnly.Kernels;

namespace PaliGemma.CpuOnly.Tests.Kernels;

/// <summary>The bandwidth probe's read loop must read every byte of its slice exactly once and nothing past it.</summary>
public sealed unsafe class MemoryBandwidthTests
{
    // Lengths from one byte to several 4 x 256-byte lane steps with every remainder; one marked byte anywhere in the slice.
    public static Arbitrary<(int Length, int Marked)> Slices() => Arb.From(
        from length in Gen.Choose(1, 5000)
        from marked in Gen.Choose(0, length - 1)
        select (length, marked));

    [Property(Arbitrary = [typeof(MemoryBandwidthTests)], MaxTest = 300)]
    public void SumSlice_counts_each_byte_once_and_stops_at_the_end((int Length, int Marked) slice)
    {
        var buffer = new byte[slice.Length + 512];
        // Bytes past the slice are all set: reading any of them would change the sum.
        Array.Fill(buffer, (byte)0xFF, slice.Length, 512);
        buffer[slice.Marked] = 1;
        fixed (byte* p = buffer)
        {
            ulong sum = MemoryBandwidth.SumSlice(p, slice.Length);
            // The vector lanes add 64-bit words (the marked byte weighs 256^(offset mod 8)); the rest is added byte by byte.
            long vectorBytes = slice.Length / 4 / 256 * 256 * 4;
            ulong expected = slice.Marked < vectorBytes ? 1UL << (8 * (slice.Marked % 8)) : 1UL;
            Assert.Equal(expected, sum);
        }
    }
}
