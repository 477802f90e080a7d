using System.Text.Json;
using PaliGemma.CpuOnly.Model;
using PaliGemma.CpuOnly.Model.Synthesis;
using PaliGemma.CpuOnly.Tensors;
using PaliGemma.CpuOnly.Tests.Cli;
using PaliGemma.CpuOnly.Tests.Golden;
using PaliGemma.CpuOnly.Tests.Tensors;
using Xunit.Abstractions;

namespace PaliGemma.CpuOnly.Tests.Lora;

/// <summary>
/// <c>paligemma synth-adapter</c> and <see cref="SyntheticAdapter"/> on the tiny golden checkpoint, checked against the
/// adapter PEFT itself saved for that checkpoint, and <c>paligemma bench --adapter</c>.
/// </summary>
[Collection(nameof(ConsoleCollection))]
public sealed class SyntheticAdapterTests(ITestOutputHelper output)
{
    private static string BaseDirectory => LoraGoldenData.BaseDirectory;

    [Fact]
    public void Written_adapter_has_the_tensor_names_shapes_order_and_config_fields_peft_saves()
    {
        // The golden adapter is PEFT's save_pretrained for the same checkpoint, targets and r = 4.
        string golden = LoraGoldenData.AdapterDirectory("lora");
        using var goldenConfig = JsonDocument.Parse(File.ReadAllText(Path.Combine(golden, "adapter_config.json")));
        var targets = goldenConfig.RootElement.GetProperty("target_modules").EnumerateArray().Select(e => e.GetString()!).ToArray();
        using var temp = new TempDirectory();
        string dir = temp.File("adapter");
        var result = SyntheticAdapter.Write(BaseDirectory, dir, new SyntheticAdapterOptions { Rank = 4, Alpha = 8, TargetModules = targets, Seed = 1 });

        using (var expected = SafetensorsFile.Open(Path.Combine(golden, "adapter_model.safetensors")))
        using (var actual = SafetensorsFile.Open(Path.Combine(dir, "adapter_model.safetensors")))
        {
            Assert.Equal(expected.Metadata, actual.Metadata);
            Assert.Equal(DataOrder(expected), DataOrder(actual));
            foreach (string name in expected.TensorNames)
            {
                Assert.Equal(expected.Get(name).Shape, actual.Get(name).Shape);
                Assert.Equal(DType.F32, actual.Get(name).DType);
            }
            Assert.Equal(expected.TensorNames.Count, result.TensorCount);
            Assert.Equal(actual.TensorNames.Sum(n => actual.Get(n).ByteLength), result.TensorBytes);
        }

        using var config = JsonDocument.Parse(File.ReadAllText(Path.Combine(dir, "adapter_config.json")));
        var root = config.RootElement;
        Assert.Equal(goldenConfig.RootElement.EnumerateObject().Select(p => p.Name).Order(StringComparer.Ordinal),
            root.EnumerateObject().Select(p => p.Name).Order(StringComparer.Ordinal));
        Assert.Equal(4, root.GetProperty("r").GetInt32());
        Assert.Equal(8, root.GetProperty("lora_alpha").GetDouble());
        Assert.Equal(targets.Order(StringComparer.Ordinal), root.GetProperty("target_modules").EnumerateArray().Select(e => e.GetString()!).Order(StringComparer.Ordinal));
        foreach (string same in new[] { "peft_type", "task_type", "bias", "use_dora", "use_rslora", "fan_in_fan_out", "modules_to_save", "lora_dropout" })
            Assert.Equal(goldenConfig.RootElement.GetProperty(same).ToString(), root.GetProperty(same).ToString());
    }

    private static unsafe string[] DataOrder(SafetensorsFile file)
    {
        var names = file.TensorNames.ToArray();
        var starts = names.Select(n => (long)file.Get(n).Pointer).ToArray();
        Array.Sort(starts, names);
        return names;
    }

    [Fact]
    public void Same_seed_gives_the_same_bytes_and_another_seed_other_values()
    {
        using var temp = new TempDirectory();
        var options = new SyntheticAdapterOptions { Seed = 7, TargetModules = ["q_proj"] };
        SyntheticAdapter.Write(BaseDirectory, temp.File("a"), options);
        SyntheticAdapter.Write(BaseDirectory, temp.File("b"), options);
        SyntheticAdapter.Write(BaseDirectory, temp.File("c"), options with { Seed = 8 });
        byte[] a = File.ReadAllBytes(Path.Combine(temp.File("a"), "adapter_model.safetensors"));
        Assert.Equal(a, File.ReadAllBytes(Path.Combine(temp.File("b"), "adapter_model.safetensors")));
        Assert.NotEqual(a, File.ReadAllBytes(Path.Combine(temp.File("c"), "adapter_model.safetensors")));

        var e = Assert.Throws<IOException>(() => SyntheticAdapter.Write(BaseDirectory, temp.File("a"), options));
        Assert.Contains("already holds an adapter", e.Message);
        SyntheticAdapter.Write(BaseDirectory, temp.File("a"), options with { Seed = 8, Overwrite = true });
        Assert.Equal(File.ReadAllBytes(Path.Combine(temp.File("c"), "adapter_model.safetensors")), File.ReadAllBytes(Path.Combine(temp.File("a"), "adapter_model.safetensors")));
    }

    [Fact]
    public void Targets_select_dense_layers_as_peft_does_and_others_are_rejected()
    {
        var config = PaliGemmaConfig.Load(Path.Combine(BaseDirectory, "config.json"));
        int text = config.Text.NumHiddenLayers, vision = config.Vision.NumHiddenLayers;
        var modules = SyntheticAdapter.SelectModules(config, SyntheticAdapterOptions.DefaultTargets);
        // q/k/v in both towers, o/gate/up/down in the decoder only (SigLIP calls them out_proj, fc1, fc2).
        Assert.Equal(7 * text + 3 * vision, modules.Count);
        Assert.Equal(3 * vision, modules.Count(m => m.Path.StartsWith("vision_tower.", StringComparison.Ordinal)));
        var q = modules.Single(m => m.Path == "language_model.model.layers.0.self_attn.q_proj");
        Assert.Equal((config.Text.HiddenSize, config.Text.NumAttentionHeads * config.Text.HeadDim), (q.InFeatures, q.OutFeatures));

        Assert.Single(SyntheticAdapter.SelectModules(config, ["multi_modal_projector.linear"]));
        Assert.Throws<ArgumentException>(() => SyntheticAdapter.SelectModules(config, ["proj"]));   // matches whole name parts only
        Assert.Contains("not a dense", Assert.Throws<ArgumentException>(() => SyntheticAdapter.SelectModules(config, ["embed_tokens"])).Message);
        Assert.Contains("not a dense", Assert.Throws<ArgumentException>(() => SyntheticAdapter.SelectModules(config, ["input_layernorm"])).Message);
    }

    [Fact]
    public void Written_adapter_loads_changes_generation_and_merged_agrees_with_run_time()
    {
        using var temp = new TempDirectory();
        string dir = temp.File("adapter");
        SyntheticAdapter.Write(BaseDirectory, dir, new SyntheticAdapterOptions { Seed = 3 });

        var model = LoraGoldenData.BaseModel;
        var adapter = model.LoadAdapter(dir);
        var config = model.Config;
        Assert.Equal(7 * config.Text.NumHiddenLayers + 3 * config.Vision.NumHiddenLayers, adapter.Modules.Count);
        Assert.All(adapter.Modules, m => Assert.Equal(2f, m.Scaling));   // alpha 16 / r 8
        Assert.All(adapter.Modules, m => Assert.Contains(m.BTransposed.ToArray(), b => b != 0));

        const string sample = "s1_caption";
        float[] pixels = LoraGoldenData.PixelValues(sample);
        int[] ids = LoraGoldenData.InputIds(sample);
        var options = new GenerationOptions { MaxNewTokens = 6, KeepStepLogits = true };
        var fromBase = new PaliGemmaGenerator(model).GenerateFromIds(pixels, [ids], options)[0];
        var fromRuntime = new PaliGemmaGenerator(model).GenerateFromIds(pixels, [ids], options with { Adapter = adapter })[0];
        using var merged = PaliGemmaModel.Load(BaseDirectory, new PaliGemmaLoadOptions { MergeAdapterDirectory = dir });
        var fromMerged = new PaliGemmaGenerator(merged).GenerateFromIds(pixels, [ids], options)[0];

        double effect = Compare.MaxRatio(fromRuntime.StepLogits![0], fromBase.StepLogits![0]);
        output.WriteLine($"first-step logits, run-time adapter vs base: max |diff| / max |base| = {effect:E3}; ids {string.Join(",", fromBase.GeneratedIds)} -> {string.Join(",", fromRuntime.GeneratedIds)}");
        Assert.True(effect > 0.01, $"the adapter barely changes the logits ({effect:E3})");
        Assert.NotEqual(fromBase.GeneratedIds, fromRuntime.GeneratedIds);
        Assert.Equal(fromRuntime.GeneratedIds, fromMerged.GeneratedIds);
        for (int s = 0; s < fromRuntime.StepLogits.Count; s++)
            Compare.Close("lora_merged_vs_runtime", $"synthetic adapter step {s}", fromMerged.StepLogits![s], fromRuntime.StepLogits[s]);
    }

    [Fact]
    public void Cli_writes_an_adapter_and_bench_reports_it_at_run_time_and_merged()
    {
        using var temp = new TempDirectory();
        string model = temp.File("model"), adapterDir = temp.File("adapter");
        SyntheticCheckpoint.Write(Path.Combine(BaseDirectory, "config.json"), model, new SyntheticCheckpointOptions { Seed = 2 });

        var (code, stdout, stderr) = CliTests.Run("synth-adapter", "--model", model, "--out", adapterDir, "--rank", "8", "--dtype", "bf16", "--seed", "4", "--quiet");
        Assert.True(code == 0, $"exit {code}: {stderr}");
        Assert.Contains("wrote", stdout);
        using (var file = SafetensorsFile.Open(Path.Combine(adapterDir, "adapter_model.safetensors")))
            Assert.All(file.TensorNames, n => Assert.Equal(DType.BF16, file.Get(n).DType));
        Assert.Equal(2, CliTests.Run("synth-adapter", "--model", model, "--out", adapterDir, "--dtype", "int8", "--force").Code);
        Assert.Equal(1, CliTests.Run("synth-adapter", "--model", model, "--out", temp.File("x"), "--targets", "nothing_here", "--quiet").Code);
        Assert.Equal(1, CliTests.Run("synth-adapter", "--model", model, "--out", adapterDir, "--quiet").Code);   // exists, no --force

        var config = PaliGemmaConfig.Load(Path.Combine(model, "config.json"));
        var modules = SyntheticAdapter.SelectModules(config, SyntheticAdapterOptions.DefaultTargets);
        long memory = modules.Sum(m => 8 * (m.InFeatures + m.OutFeatures) * sizeof(float));
        long decode = modules.Where(m => m.Path.StartsWith("language_model.", StringComparison.Ordinal)).Sum(m => 8 * (m.InFeatures + m.OutFeatures) * sizeof(float));
        foreach (bool merge in new[] { false, true })
        {
            string[] args = ["bench", "--model", model, "--adapter", adapterDir, "--new-tokens", "3", "--runs", "1", "--probe-mb", "0", "--json", "--quiet", .. (merge ? new[] { "--merge-adapter" } : [])];
            (code, stdout, stderr) = CliTests.Run(args);
            Assert.True(code == 0, $"exit {code}: {stderr}");
            var root = JsonDocument.Parse(stdout).RootElement;
            Assert.Equal(merge ? "merged" : "runtime", root.GetProperty("adapter_mode").GetString());
            Assert.Equal(modules.Count, root.GetProperty("adapter_modules").GetInt32());
            Assert.Equal(8, root.GetProperty("adapter_rank").GetInt32());
            Assert.Equal(new FileInfo(Path.Combine(adapterDir, "adapter_model.safetensors")).Length, root.GetProperty("adapter_file_bytes").GetInt64());
            Assert.Equal(memory, root.GetProperty("adapter_memory_bytes").GetInt64());
            Assert.Equal(decode, root.GetProperty("adapter_decode_bytes_per_token").GetInt64());
            Assert.True(root.GetProperty("allocated_bytes_per_decode_token").GetDouble() >= 0);
            if (merge)
            {
                // bf16 base: the merged copies are bf16 too, one per adapted matrix.
                Assert.Equal(modules.Sum(m => m.InFeatures * m.OutFeatures * 2), root.GetProperty("merged_weight_bytes").GetInt64());
            }
            else if (OperatingSystem.IsLinux())
            {
                Assert.Equal(JsonValueKind.Number, root.GetProperty("adapter_rss_added_bytes").ValueKind);
            }
        }
        Assert.Equal(2, CliTests.Run("bench", "--model", model, "--merge-adapter", "--quiet").Code);

        // Run time and merged decode steps in alternation, in one process.
        (code, stdout, stderr) = CliTests.Run("bench", "--model", model, "--adapter", adapterDir, "--compare-merged", "--new-tokens", "4", "--runs", "2",
            "--probe-mb", "0", "--json", "--quiet");
        Assert.True(code == 0, $"exit {code}: {stderr}");
        var interleaved = JsonDocument.Parse(stdout).RootElement.GetProperty("interleaved_vs_merged");
        Assert.Equal(2 * 3, interleaved.GetProperty("steps").GetInt32());
        double runtimeStep = interleaved.GetProperty("runtime_decode_s_per_token_median").GetDouble();
        double mergedStep = interleaved.GetProperty("merged_decode_s_per_token_median").GetDouble();
        Assert.True(runtimeStep > 0 && mergedStep > 0 && interleaved.GetProperty("base_decode_s_per_token_median").GetDouble() > 0);
        // The ratio of the two medians, up to their rounding to 1e-6 s in the JSON.
        double ratio = runtimeStep / mergedStep;
        Assert.InRange(interleaved.GetProperty("runtime_over_merged").GetDouble(), ratio * (1 - 1e-6 / runtimeStep - 1e-6 / mergedStep) - 1e-6,
            ratio * (1 + 1e-6 / runtimeStep + 1e-6 / mergedStep) + 1e-6);
        Assert.Equal(2, CliTests.Run("bench", "--model", model, "--adapter", adapterDir, "--merge-adapter", "--compare-merged", "--quiet").Code);
        Assert.Equal(2, CliTests.Run("bench", "--model", model, "--compare-merged", "--quiet").Code);
    }
}
