using PaliGemma.CpuOnly.Model;

namespace PaliGemma.CpuOnly.Tests.Model;

/// <summary>The bundled PaliGemma 2 full-size configs parse to the public Gemma 2 shapes.</summary>
public sealed class FullSizeConfigTests
{
    [Theory]
    [InlineData("3b", 2304, 9216, 26, 8, 4, 256, 256f)]
    [InlineData("10b", 3584, 14336, 42, 16, 8, 256, 256f)]
    [InlineData("28b", 4608, 36864, 46, 32, 16, 128, 144f)]
    public void PaliGemma2_configs_have_the_gemma2_shapes(string size, int hidden, int mlp, int layers, int heads, int kvHeads, int headDim, float queryScalar)
    {
        foreach (int px in new[] { 224, 448, 896 })
        {
            var c = PaliGemmaConfig.Load(Path.Combine(TestPaths.RepoRoot, "configs", $"paligemma2-{size}-pt-{px}.config.json"));
            var t = c.Text;
            Assert.Equal("gemma2", t.ModelType);
            Assert.Equal((hidden, mlp, layers, heads, kvHeads, headDim), (t.HiddenSize, t.IntermediateSize, t.NumHiddenLayers, t.NumAttentionHeads, t.NumKeyValueHeads, t.HeadDim));
            Assert.Equal(queryScalar, t.QueryPreAttnScalar);
            Assert.Equal(4096, t.SlidingWindow);
            Assert.Equal(50f, t.AttnLogitSoftcapping);
            Assert.Equal(30f, t.FinalLogitSoftcapping);
            Assert.Equal(257216, t.VocabSize);
            Assert.Equal(257152, c.ImageTokenIndex);
            Assert.Equal(hidden, c.ProjectionDim);
            Assert.Equal(px, c.Vision.ImageSize);
            Assert.Equal((px / 14) * (px / 14), c.NumImageTokens);
        }
    }
}
