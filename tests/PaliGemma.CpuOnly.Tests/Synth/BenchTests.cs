using System.Text.Json;
using PaliGemma.CpuOnly.Kernels;
using PaliGemma.CpuOnly.Model;
using PaliGemma.CpuOnly.Model.Diagnostics;
using PaliGemma.CpuOnly.Model.Synthesis;
using PaliGemma.CpuOnly.Tests.Cli;
using PaliGemma.CpuOnly.Tests.Tensors;

namespace PaliGemma.CpuOnly.Tests.Synth;

/// <summary><c>paligemma bench</c> on a synthesized tiny checkpoint, and the pieces it reports.</summary>
[Collection(nameof(ConsoleCollection))]
public sealed class BenchTests
{
    private static string TinyConfig => Path.Combine(TestPaths.Golden, "tiny-mqa-56", "config.json");

    [Fact]
    public void Bench_json_reports_every_stage_with_the_requested_counts()
    {
        using var temp = new TempDirectory();
        string dir = temp.File("m");
        SyntheticCheckpoint.Write(TinyConfig, dir, new SyntheticCheckpointOptions { Seed = 2 });
        var (code, stdout, stderr) = CliTests.Run("bench", "--model", dir, "--new-tokens", "4", "--runs", "2", "--probe-mb", "16", "--json", "--quiet");
        Assert.True(code == 0, $"exit {code}: {stderr}");
        Assert.Equal("", stderr);

        using var doc = JsonDocument.Parse(stdout);
        var root = doc.RootElement;
        Assert.Equal(3, root.GetProperty("decode_steps").GetInt32());
        Assert.Equal(2, root.GetProperty("runs").GetInt32());
        using (var model = PaliGemmaModel.Load(dir))
            Assert.Equal(model.Tokenizer.BuildPrompt("caption en", model.NumImageTokens).Length, root.GetProperty("prompt_tokens").GetInt32());
        foreach (string key in new[] { "load_s", "preprocess_s", "vision_s", "prefill_s", "prefill_tokens_per_s", "decode_s_per_token",
                     "decode_tokens_per_s", "decode_weight_gb_per_s", "memory_read_gb_per_s", "decode_fraction_of_memory_read",
                     "mapped_read_gb_per_s", "decode_fraction_of_mapped_read" })
            Assert.True(root.GetProperty(key).GetDouble() > 0, key);
        Assert.True(root.GetProperty("allocated_bytes_per_decode_token").GetDouble() >= 0);
        if (OperatingSystem.IsLinux()) Assert.True(root.GetProperty("peak_rss_bytes").GetInt64() > 0);

        // bf16 default: the embedding (tied LM head) plus 7 matrices per decoder layer, 2 bytes each.
        var t = PaliGemmaConfig.Load(TinyConfig).Text;
        long q = t.NumAttentionHeads * t.HeadDim, kv = t.NumKeyValueHeads * t.HeadDim;
        long perLayer = t.HiddenSize * (q + 2 * kv) + q * t.HiddenSize + 3L * t.HiddenSize * t.IntermediateSize;
        Assert.Equal(2 * ((long)t.VocabSize * t.HiddenSize + t.NumHiddenLayers * perLayer), root.GetProperty("decode_weight_bytes_per_token").GetInt64());
        // The mapped-read probe reads exactly the weights decode streams.
        Assert.Equal(root.GetProperty("decode_weight_bytes_per_token").GetInt64(), root.GetProperty("mapped_read_bytes").GetInt64());
        Assert.False(root.TryGetProperty("decode_profile", out _));

        var runs = root.GetProperty("runs_detail");
        Assert.Equal(2, runs.GetArrayLength());
        foreach (var run in runs.EnumerateArray()) Assert.Equal(3, run.GetProperty("decode_step_s").GetArrayLength());
    }

    [Fact]
    public void Bench_plain_output_names_each_figure_and_bad_options_are_usage_errors()
    {
        using var temp = new TempDirectory();
        string dir = temp.File("m");
        SyntheticCheckpoint.Write(TinyConfig, dir, new SyntheticCheckpointOptions { Seed = 2 });
        var image = Path.Combine(TestPaths.Golden, "tiny-mqa-56", "gray_200x150.png");
        var (code, stdout, stderr) = CliTests.Run("bench", "--model", dir, "--image", image, "--new-tokens", "2", "--runs", "1", "--probe-mb", "0");
        Assert.True(code == 0, $"exit {code}: {stderr}");
        foreach (string label in new[] { "load", "preprocess", "vision", "prefill", "decode", "peak RSS", "allocated" }) Assert.Contains(label, stdout);
        Assert.DoesNotContain("memory read", stdout);
        Assert.Contains("[bench]", stderr);

        Assert.Equal(2, CliTests.Run("bench", "--model", dir, "--new-tokens", "1").Code);
        Assert.Equal(2, CliTests.Run("bench", "--model", dir, "--runs", "0").Code);
        Assert.Equal(2, CliTests.Run("bench", "--model", dir, "--bogus", "1").Code);
        Assert.Equal(1, CliTests.Run("bench", "--model", temp.File("missing"), "--quiet").Code);
    }

    [Fact]
    public void Bench_versus_runs_each_checkpoint_in_turn_and_reports_speedups_over_the_first()
    {
        using var temp = new TempDirectory();
        string dir = temp.File("m"), q8 = temp.File("q8");
        SyntheticCheckpoint.Write(TinyConfig, dir, new SyntheticCheckpointOptions { Seed = 3 });
        Assert.Equal(0, CliTests.Run("quantize", "--model", dir, "--to", "q8", "--out", q8, "--quiet").Code);
        var (code, stdout, stderr) = CliTests.Run("bench", "--model", dir, "--versus", q8, "--new-tokens", "4", "--runs", "3", "--probe-mb", "16", "--json", "--quiet");
        Assert.True(code == 0, $"exit {code}: {stderr}");

        using var doc = JsonDocument.Parse(stdout);
        var root = doc.RootElement;
        var versus = root.GetProperty("versus");
        Assert.Equal(2, versus.GetArrayLength());
        var (first, second) = (versus[0], versus[1]);
        Assert.Equal(Path.GetFullPath(dir), first.GetProperty("model").GetString());
        Assert.Equal(Path.GetFullPath(q8), second.GetProperty("model").GetString());
        Assert.Equal(root.GetProperty("weights_dtype").GetString(), first.GetProperty("weights_dtype").GetString());
        Assert.Equal("Q8", second.GetProperty("weights_dtype").GetString());
        Assert.Equal(root.GetProperty("decode_weight_bytes_per_token").GetInt64(), first.GetProperty("decode_weight_bytes_per_token").GetInt64());
        // q8 stores about a byte per weight against bf16's two.
        Assert.InRange(second.GetProperty("decode_weight_bytes_per_token").GetInt64(), 1, first.GetProperty("decode_weight_bytes_per_token").GetInt64() * 3 / 4);
        foreach (var entry in new[] { first, second })
        {
            Assert.Equal(3, entry.GetProperty("rounds").GetInt32());
            Assert.Equal(3 * 3, entry.GetProperty("decode_steps").GetInt32());
            foreach (string key in new[] { "vision_s", "prefill_s", "decode_s_per_token", "decode_tokens_per_s", "decode_weight_gb_per_s",
                         "decode_fraction_of_memory_read", "vision_speedup_vs_first", "prefill_speedup_vs_first", "decode_speedup_vs_first" })
                Assert.True(entry.GetProperty(key).GetDouble() > 0, key);
        }
        // The first model is its own baseline: every ratio of neighbouring turns is exactly 1.
        foreach (string key in new[] { "vision_speedup_vs_first", "prefill_speedup_vs_first", "decode_speedup_vs_first" })
            Assert.Equal(1.0, first.GetProperty(key).GetDouble());

        var plain = CliTests.Run("bench", "--model", dir, "--versus", q8, "--new-tokens", "2", "--runs", "1", "--probe-mb", "0", "--quiet");
        Assert.True(plain.Code == 0, plain.Err);
        Assert.Contains("versus", plain.Out);
        Assert.Contains(q8, plain.Out);

        Assert.Equal(2, CliTests.Run("bench", "--model", dir, "--versus", temp.File("missing")).Code);
        Assert.Equal(2, CliTests.Run("bench", "--model", dir, "--versus", q8, "--profile").Code);
        Assert.Equal(2, CliTests.Run("bench", "--model", dir, "--versus", ",").Code);
    }

    [Fact]
    public void Bench_profile_times_every_decoder_operation_of_a_decode_step()
    {
        using var temp = new TempDirectory();
        string dir = temp.File("m");
        SyntheticCheckpoint.Write(TinyConfig, dir, new SyntheticCheckpointOptions { Seed = 3 });
        var (code, stdout, stderr) = CliTests.Run("bench", "--model", dir, "--new-tokens", "4", "--runs", "2", "--probe-mb", "0", "--profile", "--json", "--quiet");
        Assert.True(code == 0, $"exit {code}: {stderr}");
        using var doc = JsonDocument.Parse(stdout);
        var profile = doc.RootElement.GetProperty("decode_profile");
        // Steps 2 and 3 of each run: the first step of a run is left out.
        Assert.Equal(4, profile.GetProperty("steps").GetInt32());
        var t = PaliGemmaConfig.Load(TinyConfig).Text;
        var operations = profile.GetProperty("operations").EnumerateArray().ToList();
        double CallsPerToken(Func<string, bool> match) =>
            operations.Where(o => match(o.GetProperty("name").GetString()!)).Sum(o => o.GetProperty("calls_per_token").GetDouble());
        // Per layer: o and down alone; q+k+v and gate+up each timed as one same-input group.
        Assert.Equal(2 * t.NumHiddenLayers, CallsPerToken(n => n.StartsWith("matmul ", StringComparison.Ordinal)));
        int q = t.NumAttentionHeads * t.HeadDim, kv = t.NumKeyValueHeads * t.HeadDim;
        Assert.Equal(t.NumHiddenLayers, CallsPerToken(n => n == $"fused {q}+{kv}+{kv}x{t.HiddenSize}"));
        Assert.Equal(t.NumHiddenLayers, CallsPerToken(n => n == $"fused {t.IntermediateSize}+{t.IntermediateSize}x{t.HiddenSize}"));
        Assert.Equal(t.NumHiddenLayers, CallsPerToken(n => n == "attention"));
        Assert.All(operations, o => Assert.True(o.GetProperty("s_per_token").GetDouble() >= 0));
        Assert.Equal(2L * t.VocabSize * t.HiddenSize, profile.GetProperty("lm_head_bytes").GetDouble());
        Assert.True(profile.GetProperty("lm_head_alone_s").GetDouble() > 0);
        Assert.True(profile.GetProperty("step_s").GetDouble() > 0);

        var plain = CliTests.Run("bench", "--model", dir, "--new-tokens", "3", "--runs", "1", "--probe-mb", "0", "--profile", "--quiet");
        Assert.True(plain.Code == 0, plain.Err);
        foreach (string label in new[] { "decode profile", "matmul", "attention", "LM head alone", "outside the backend" })
            Assert.Contains(label, plain.Out);
    }

    [Fact]
    public unsafe void Mapped_read_probe_reads_every_region_once_in_contiguous_shares()
    {
        var first = GC.AllocateArray<byte>(1000, pinned: true);
        var second = GC.AllocateArray<byte>(3001, pinned: true);
        var empty = GC.AllocateArray<byte>(1, pinned: true);
        fixed (byte* pa = first, pb = second, pe = empty)
        {
            nint a = (nint)pa, b = (nint)pb;
            MemoryRegion[] regions = [new(a, first.Length), new((nint)pe, 0), new(b, second.Length)];
            foreach (int threads in new[] { 1, 2, 3, 7 })
            {
                var shares = MemoryBandwidth.Split(regions, 4001, threads);
                Assert.Equal(threads, shares.Length);
                // Shares differ by at most one byte and, laid end to end, are the regions in order.
                long[] sizes = shares.Select(s => s.Sum(p => p.Length)).ToArray();
                Assert.True(sizes.Max() - sizes.Min() <= 1, string.Join(",", sizes));
                var bytes = shares.SelectMany(s => s).SelectMany(p => Enumerable.Range(0, (int)p.Length).Select(i => p.Address + i)).ToList();
                var expected = Enumerable.Range(0, first.Length).Select(i => a + i).Concat(Enumerable.Range(0, second.Length).Select(i => b + i));
                Assert.Equal(expected, bytes);
            }

            var result = MemoryBandwidth.MeasureRead(regions, threads: 2, passes: 3);
            Assert.Equal(4001, result.BufferBytes);
            Assert.Equal(2, result.Threads);
            Assert.Equal(3, result.PassGBps.Count);
            Assert.All(result.PassGBps, g => Assert.True(double.IsFinite(g) && g > 0, $"{g} GB/s"));
            Assert.Throws<ArgumentException>(() => MemoryBandwidth.MeasureRead([new MemoryRegion(a, 100)]));
            Assert.Throws<ArgumentException>(() => MemoryBandwidth.MeasureRead([new MemoryRegion(0, 1000)]));
            Assert.Throws<ArgumentException>(() => MemoryBandwidth.MeasureRead([new MemoryRegion(a, -1)]));
        }
    }

    [Fact]
    public void Decode_weight_regions_cover_the_bytes_decode_streams()
    {
        using var temp = new TempDirectory();
        string dir = temp.File("m");
        SyntheticCheckpoint.Write(TinyConfig, dir, new SyntheticCheckpointOptions { Seed = 4 });
        using var model = PaliGemmaModel.Load(dir);
        var regions = model.Decoder.DecodeWeightRegions();
        var t = model.Config.Text;
        Assert.Equal(7 * t.NumHiddenLayers + 1, regions.Count);
        Assert.Equal(model.Decoder.DecodeWeightBytesPerToken(), regions.Sum(r => r.Length));
        Assert.All(regions, r => Assert.NotEqual(0, r.Address));
        Assert.Equal(regions.Count, regions.Select(r => r.Address).Distinct().Count());
    }

    [Fact]
    public void Decode_weight_bytes_count_matrices_and_lm_head_in_their_stored_dtype()
    {
        using var temp = new TempDirectory();
        string f32 = temp.File("f32"), bf16 = temp.File("bf16");
        SyntheticCheckpoint.Write(TinyConfig, f32, new SyntheticCheckpointOptions { DType = PaliGemma.CpuOnly.Tensors.DType.F32 });
        SyntheticCheckpoint.Write(TinyConfig, bf16, new SyntheticCheckpointOptions { DType = PaliGemma.CpuOnly.Tensors.DType.BF16 });
        var text = PaliGemmaConfig.Load(TinyConfig).Text;
        Assert.Equal(2 * ModelFootprint.DecodeWeightBytesPerToken(bf16, text), ModelFootprint.DecodeWeightBytesPerToken(f32, text));
    }

    [Fact]
    public void Memory_probe_times_every_pass_on_the_requested_threads()
    {
        var result = MemoryBandwidth.MeasureRead(8 << 20, threads: 2, passes: 3);
        Assert.Equal(8 << 20, result.BufferBytes);
        Assert.Equal(2, result.Threads);
        Assert.Equal(3, result.PassGBps.Count);
        Assert.All(result.PassGBps, g => Assert.True(double.IsFinite(g) && g > 0, $"{g} GB/s"));
        Assert.InRange(result.MedianGBps, result.PassGBps.Min(), result.BestGBps);
        Assert.Throws<ArgumentOutOfRangeException>(() => MemoryBandwidth.MeasureRead(100));
    }
}
