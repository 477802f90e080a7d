using FsCheck;
using FsCheck.Fluent;
using FsCheck.Xunit;
using PaliGemma.CpuOnly.Kernels;
using static PaliGemma.CpuOnly.Tests.Kernels.KernelTestSupport;

namespace PaliGemma.CpuOnly.Tests.Kernels;

public sealed class ElementwiseTests
{
    // Lengths around the 16384-float chunk: one chunk on the calling thread, several with a partial last one on the threads.
    [Property(MaxTest = 40)]
    public void Add_matches_scalar_sum_in_place_or_not(PositiveInt seed, bool inPlace)
    {
        var random = new Random(seed.Get);
        int length = random.Next(4) switch { 0 => random.Next(0, 100), 1 => 16384, 2 => 16384 + 1 + random.Next(100), _ => random.Next(40000, 70000) };
        float[] a = RandomFloats(random, length, -3f, 3f), b = RandomFloats(random, length, -3f, 3f);
        float[] original = (float[])a.Clone();
        float[] destination = inPlace ? a : new float[length + 5];

        Elementwise.Add(a, b, destination);

        for (int i = 0; i < length; i++)
            Assert.Equal(original[i] + b[i], destination[i]);
        for (int i = length; i < destination.Length; i++)
            Assert.Equal(0f, destination[i]);
    }

    [Fact]
    public void Add_rejects_mismatched_lengths()
    {
        Assert.Equal("b", Assert.Throws<ArgumentException>(() => Elementwise.Add(new float[5], new float[4], new float[5])).ParamName);
        Assert.Equal("destination", Assert.Throws<ArgumentException>(() => Elementwise.Add(new float[5], new float[5], new float[4])).ParamName);
    }
}
