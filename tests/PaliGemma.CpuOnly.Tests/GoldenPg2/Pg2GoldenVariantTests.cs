using System.Text.Json;
using PaliGemma.CpuOnly.Model;
using PaliGemma.CpuOnly.Tensors;
using PaliGemma.CpuOnly.Tests.Golden;

namespace PaliGemma.CpuOnly.Tests.GoldenPg2;

/// <summary>The bf16 and sharded copies of pg2-tiny-56, and the training-style suffix score with its masks.</summary>
public sealed class Pg2GoldenVariantTests
{
    private const string Tiny = Pg2Golden.Tiny;

    public static TheoryData<string> Bf16Samples()
    {
        var data = new TheoryData<string>();
        foreach (var s in Pg2Golden.CaseJson(Tiny).GetProperty("bf16_weights_upcast_to_f32_references").GetProperty("samples").EnumerateArray())
            data.Add(s.GetProperty("sample").GetString()!);
        return data;
    }

    [Theory]
    [MemberData(nameof(Bf16Samples))]
    public void Bf16_weights_match_the_upcast_reference(string sampleName)
    {
        var model = Pg2Golden.Model(Tiny, "bf16");
        Assert.True(model.Config.Text.IsGemma2);
        GoldenChecks.Bf16Upcast(Pg2Golden.CaseJson(Tiny), Pg2Golden.Sample(Tiny, sampleName), model, "pg2_");
    }

    [Fact]
    public void Sharded_checkpoint_gives_results_identical_to_the_single_file()
    {
        var sample = Pg2Golden.Sample(Tiny, "s1_caption");
        var sharded = GoldenChecks.ShardedEqualsSingle(sample, Pg2Golden.Model(Tiny), Pg2Golden.Model(Tiny, "sharded"));
        Assert.Equal(sample.Json.GetProperty("generated_ids_list")[0].EnumerateArray().Select(e => e.GetInt32()), sharded.GeneratedIds);
    }

    [Fact]
    public void Suffix_score_matches_the_reference_loss_and_logits()
    {
        var sample = Pg2Golden.Sample(Tiny, "t1_suffix_loss");
        var model = Pg2Golden.Model(Tiny);
        var (prefix, suffix) = model.Tokenizer.BuildPromptWithSuffix(sample.Prompts[0], sample.Json.GetProperty("suffix").GetString()!, model.NumImageTokens);
        Assert.Equal(sample.Npy("input_ids").ToInt64().Select(x => (int)x), prefix.Concat(suffix));

        double loss = new PaliGemmaGenerator(model).Score(sample.Floats("pixel_values"), prefix, suffix, out float[] logits);
        Compare.Close("pg2_suffix_logits", "suffix logits", logits, sample.Floats("logits"));
        double expected = sample.Json.GetProperty("loss").GetDouble();
        Assert.True(Math.Abs(loss - expected) <= 1e-4 * Math.Abs(expected), $"loss {loss} vs reference {expected}");
    }

    /// <summary>Training-style masks: bidirectional prefix, causal suffix, and the window on sliding layers.</summary>
    [Fact]
    public void Suffix_masks_equal_the_reference_training_masks()
    {
        var sample = Pg2Golden.Sample(Tiny, "t1_suffix_loss");
        int window = Pg2Golden.Model(Tiny).Config.Text.SlidingWindow!.Value;
        long[] tokenTypes = sample.Npy("token_type_ids").ToInt64();
        int tokens = tokenTypes.Length, prefix = tokenTypes.Count(t => t == 0);
        byte[] valid = sample.Npy("attention_mask").ToInt64().Select(x => (byte)x).ToArray();
        foreach (var (key, layerWindow) in new[] { ("allowed_attention_training_sliding_uint8", window), ("allowed_attention_training_global_uint8", 0) })
        {
            var allowed = new byte[tokens * tokens];
            AttentionMask.BuildAllowed(tokens, prefix, layerWindow, valid, allowed);
            Assert.Equal(sample.Npy(key).ToUInt8(), allowed);
        }
    }

    [Fact]
    public void Suffix_score_from_image_and_text_matches_the_reference_loss()
    {
        var sample = Pg2Golden.Sample(Tiny, "t1_suffix_loss");
        var model = Pg2Golden.Model(Tiny);
        var image = PaliGemma.CpuOnly.Model.Imaging.ImageLoader.Load(Path.Combine(sample.CaseDirectory, sample.Images[0]));
        double loss = new PaliGemmaGenerator(model).Score(image, sample.Prompts[0], sample.Json.GetProperty("suffix").GetString()!);
        double expected = sample.Json.GetProperty("loss").GetDouble();
        Assert.True(Math.Abs(loss - expected) <= 1e-4 * Math.Abs(expected), $"loss {loss} vs reference {expected}");
    }
}
