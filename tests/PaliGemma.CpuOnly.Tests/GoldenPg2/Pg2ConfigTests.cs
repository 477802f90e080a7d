using System.Text;
using PaliGemma.CpuOnly.Model;

namespace PaliGemma.CpuOnly.Tests.GoldenPg2;

/// <summary>Gemma2Config defaults (transformers 4.47.1) and the checks on Gemma 2 keys.</summary>
public sealed class Pg2ConfigTests
{
    public static TheoryData<string> Cases()
    {
        var data = new TheoryData<string>();
        foreach (var c in Pg2Golden.CaseNames) data.Add(c);
        return data;
    }

    private static PaliGemmaConfig Parse(string json) => PaliGemmaConfig.Parse(Encoding.UTF8.GetBytes(json), "cfg.json");

    [Theory]
    [MemberData(nameof(Cases))]
    public void Config_defaults_equal_the_full_config_transformers_writes(string caseName)
    {
        string dir = Path.Combine(Pg2Golden.Root, caseName);
        var minimal = PaliGemmaConfig.Load(Path.Combine(dir, "config.json"));
        var full = PaliGemmaConfig.Load(Path.Combine(dir, "config.full.json"));
        Assert.Equal(full.Vision, minimal.Vision);
        Assert.Equal(full.Text, minimal.Text);
        Assert.Equal(full with { Vision = minimal.Vision, Text = minimal.Text }, minimal);
        Assert.True(minimal.Text.IsGemma2);
    }

    [Fact]
    public void The_tiny_case_reads_its_gemma2_keys_and_its_copies_agree()
    {
        var c = PaliGemmaConfig.Load(Path.Combine(Pg2Golden.Root, Pg2Golden.Tiny, "config.json"));
        Assert.Equal(("gemma2", 64, 4, 4, 2, 16, 128), (c.Text.ModelType, c.Text.HiddenSize, c.Text.NumHiddenLayers, c.Text.NumAttentionHeads,
            c.Text.NumKeyValueHeads, c.Text.HeadDim, c.Text.IntermediateSize));
        Assert.Equal((24f, 8, 50f, 30f), (c.Text.QueryPreAttnScalar, c.Text.SlidingWindow, c.Text.AttnLogitSoftcapping, c.Text.FinalLogitSoftcapping));
        Assert.Equal(1f / MathF.Sqrt(24f), c.Text.AttentionScale);
        Assert.Equal([8, 0, 8, 0], Enumerable.Range(0, 4).Select(c.Text.LayerWindow));
        foreach (var variant in new[] { "bf16", "sharded" })
            Assert.Equal(c.Text, PaliGemmaConfig.Load(Path.Combine(Pg2Golden.Root, Pg2Golden.Tiny, variant, "config.json")).Text);
    }

    [Fact]
    public void An_almost_empty_gemma2_text_config_gets_the_gemma2_defaults()
    {
        var t = Parse("""{"projection_dim":2304,"text_config":{"model_type":"gemma2","vocab_size":257216}}""").Text;
        Assert.Equal((2304, 9216, 26, 8, 4, 256), (t.HiddenSize, t.IntermediateSize, t.NumHiddenLayers, t.NumAttentionHeads, t.NumKeyValueHeads, t.HeadDim));
        Assert.Equal((256f, 4096, 50f, 30f), (t.QueryPreAttnScalar, t.SlidingWindow, t.AttnLogitSoftcapping, t.FinalLogitSoftcapping));
        Assert.Equal((1e-6f, 10000f, 8192, "gelu_pytorch_tanh", false, true), (t.RmsNormEps, t.RopeTheta, t.MaxPositionEmbeddings, t.HiddenActivation, t.AttentionBias, t.TieWordEmbeddings));
        // Gemma 1 has none of the Gemma 2 keys, whatever the JSON says.
        var g1 = Parse("""{"text_config":{"model_type":"gemma","hidden_size":2048,"vocab_size":257216,"sliding_window":8}}""").Text;
        Assert.Equal((null, null, null, null, 0), (g1.QueryPreAttnScalar, g1.SlidingWindow, g1.AttnLogitSoftcapping, g1.FinalLogitSoftcapping, g1.LayerWindow(0)));
    }

    [Fact]
    public void Null_soft_caps_turn_the_caps_off_and_hidden_act_is_not_a_gemma2_fallback()
    {
        var t = Parse("""{"projection_dim":2304,"text_config":{"model_type":"gemma2","vocab_size":257216,"attn_logit_softcapping":null,"final_logit_softcapping":null,"hidden_act":"gelu"}}""").Text;
        Assert.Null(t.AttnLogitSoftcapping);
        Assert.Null(t.FinalLogitSoftcapping);
        Assert.Equal("gelu_pytorch_tanh", t.HiddenActivation);
    }

    [Theory]
    [InlineData("""{"projection_dim":2304,"text_config":{"model_type":"gemma2","vocab_size":257216,"sliding_window":0}}""", "sliding_window")]
    [InlineData("""{"projection_dim":2304,"text_config":{"model_type":"gemma2","vocab_size":257216,"query_pre_attn_scalar":-1}}""", "query_pre_attn_scalar")]
    [InlineData("""{"projection_dim":2304,"text_config":{"model_type":"gemma2","vocab_size":257216,"attn_logit_softcapping":"big"}}""", "attn_logit_softcapping")]
    [InlineData("""{"projection_dim":2304,"text_config":{"model_type":"gemma2","vocab_size":257216,"final_logit_softcapping":0}}""", "final_logit_softcapping")]
    [InlineData("""{"projection_dim":2304,"text_config":{"model_type":"gemma2","vocab_size":257216,"hidden_activation":"gelu"}}""", "hidden_activation")]
    [InlineData("""{"text_config":{"model_type":"gemma3","vocab_size":257216}}""", "model_type")]
    public void Bad_gemma2_configs_are_rejected_naming_the_key(string json, string mentioned)
    {
        var e = Assert.Throws<InvalidDataException>(() => Parse(json));
        Assert.Contains("cfg.json", e.Message);
        Assert.Contains(mentioned, e.Message);
    }
}
