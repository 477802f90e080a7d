using System.Security.Cryptography;
using PaliGemma.CpuOnly.Model;
using PaliGemma.CpuOnly.Model.Lora;
using PaliGemma.CpuOnly.Tensors;
using PaliGemma.CpuOnly.Tests.Golden;
using Xunit.Abstractions;

namespace PaliGemma.CpuOnly.Tests.Lora;

/// <summary>
/// PEFT LoRA adapters against the PEFT reference: run-time adapters (main, rslora, alpha2), the merged model, the merged
/// weights, and one base model serving several adapters. Bounds as in the golden tests: ids exact, tensors
/// max |diff| ≤ 1e-4 · max |ref|.
/// </summary>
public sealed class LoraGoldenTests(ITestOutputHelper output)
{
    public static TheoryData<string, string> RuntimeCases()
    {
        var data = new TheoryData<string, string>();
        foreach (var s in LoraGoldenData.CaseJson.GetProperty("samples").EnumerateArray()) data.Add("lora", s.GetProperty("name").GetString()!);
        foreach (var v in LoraGoldenData.CaseJson.GetProperty("variants").EnumerateArray())
        foreach (var s in v.GetProperty("samples").EnumerateArray())
            data.Add(v.GetProperty("name").GetString()!, s.GetProperty("sample").GetString()!);
        return data;
    }

    public static TheoryData<string> MergedSamples()
    {
        var data = new TheoryData<string>();
        foreach (var s in LoraGoldenData.CaseJson.GetProperty("merged").GetProperty("samples").EnumerateArray()) data.Add(s.GetProperty("sample").GetString()!);
        return data;
    }

    [Fact]
    public void The_base_checkpoint_is_the_one_the_references_were_made_from()
    {
        var expected = LoraGoldenData.CaseJson.GetProperty("base_model").GetProperty("model_safetensors_sha256").GetString();
        using var stream = File.OpenRead(Path.Combine(LoraGoldenData.BaseDirectory, "model.safetensors"));
        Assert.Equal(expected, Convert.ToHexStringLower(SHA256.HashData(stream)));
    }

    [Fact]
    public void The_adapter_adapts_the_modules_the_reference_lists_with_its_scaling()
    {
        var adapter = LoraGoldenData.BaseModel.LoadAdapter(LoraGoldenData.AdapterDirectory("lora"));
        var expected = LoraGoldenData.CaseJson.GetProperty("adapted_modules").EnumerateArray().Select(e => e.GetString()!).Order(StringComparer.Ordinal);
        Assert.Equal(expected, adapter.Modules.Select(m => m.Name).Order(StringComparer.Ordinal));
        Assert.Equal(LoraNameLayout.Classic, adapter.Layout);
        float scaling = (float)LoraGoldenData.CaseJson.GetProperty("scaling").GetProperty("main_adapter_scaling").GetDouble();
        Assert.All(adapter.Modules, m => Assert.Equal(scaling, m.Scaling));
        foreach (string variant in new[] { "rslora", "alpha2" })
        {
            var v = LoraGoldenData.BaseModel.LoadAdapter(LoraGoldenData.AdapterDirectory(variant));
            float expectedScaling = (float)LoraGoldenData.Variant(variant).GetProperty("expected_scaling").GetDouble();
            Assert.All(v.Modules, m => Assert.Equal(expectedScaling, m.Scaling));
        }
    }

    [Theory]
    [MemberData(nameof(RuntimeCases))]
    public void Runtime_adapter_matches_the_reference(string variant, string sample)
    {
        var model = LoraGoldenData.BaseModel;
        var adapter = model.LoadAdapter(LoraGoldenData.AdapterDirectory(variant));
        CheckAgainstReference(model, adapter, variant, sample);
    }

    [Theory]
    [MemberData(nameof(MergedSamples))]
    public void Merged_adapter_matches_the_reference(string sample)
    {
        var model = LoraGoldenData.MergedModel;
        Assert.NotNull(model.MergedAdapter);
        CheckAgainstReference(model, null, "merged", sample);

        // The merged model's vision tower has the vision LoRA in its weights: it matches the run-time references too.
        var trace = new VisionTrace();
        var features = model.EncodeImages(LoraGoldenData.PixelValues(sample), 1, trace);
        Report(sample, "merged vision_last_hidden_state", Compare.Close("lora_vision_last_hidden_state", $"merged {sample} vision",
            trace.LastHiddenState, LoraGoldenData.Floats(LoraGoldenData.Files("lora", sample).GetProperty("vision_last_hidden_state").GetString()!)));
        Report(sample, "merged image_features_scaled", Compare.Close("lora_image_features_scaled", $"merged {sample} features",
            features, LoraGoldenData.Floats(LoraGoldenData.Files("lora", sample).GetProperty("image_features_scaled").GetString()!)));
    }

    private void CheckAgainstReference(PaliGemmaModel model, LoraAdapter? adapter, string variant, string sample)
    {
        var files = LoraGoldenData.Files(variant, sample);
        float[] pixels = LoraGoldenData.PixelValues(sample);
        int[] ids = LoraGoldenData.InputIds(sample);

        var trace = new VisionTrace();
        var features = model.EncodeImages(pixels, 1, trace, default, adapter);
        if (files.TryGetProperty("vision_last_hidden_state", out var visionFile))
            Report(sample, "vision_last_hidden_state", Compare.Close("lora_vision_last_hidden_state", $"{variant} {sample} vision",
                trace.LastHiddenState, LoraGoldenData.Floats(visionFile.GetString()!)));
        if (files.TryGetProperty("image_features_scaled", out var featuresFile))
            Report(sample, "image_features_scaled", Compare.Close("lora_image_features_scaled", $"{variant} {sample} features",
                features, LoraGoldenData.Floats(featuresFile.GetString()!)));

        int vocab = model.Decoder.VocabSize;
        var session = new PaliGemmaSession(model, 1, ids.Length, adapter);
        var logits = new float[ids.Length * vocab];
        session.Prefill(ids, default, ids.Length, features, logits, new PrefillOptions { AllLogits = true });
        Report(sample, "prefix_logits", Compare.Close("lora_prefix_logits", $"{variant} {sample} prefix logits",
            logits, LoraGoldenData.Floats(files.GetProperty("prefix_logits").GetString()!)));

        var results = new PaliGemmaGenerator(model).GenerateFromIds(pixels, [ids],
            new GenerationOptions { MaxNewTokens = LoraGoldenData.MaxNewTokens(sample), KeepStepLogits = true, Adapter = adapter });
        GoldenModelTests.CheckGeneration($"{variant} {sample}", results,
            LoraGoldenData.FilePath(variant, sample, "generated_ids"), LoraGoldenData.FilePath(variant, sample, "step_logits"), "lora_step_logits");
    }

    [Fact]
    public unsafe void Merged_weights_equal_the_reference_and_only_adapted_matrices_are_copied()
    {
        var model = LoraGoldenData.MergedModel;
        var adapter = model.MergedAdapter!;
        using var reference = SafetensorsFile.Open(Path.Combine(LoraGoldenData.CaseDirectory,
            LoraGoldenData.CaseJson.GetProperty("merged").GetProperty("merged_weights_file").GetString()!));
        Assert.Equal(reference.TensorNames.Order(StringComparer.Ordinal), adapter.Modules.Select(m => m.Name + ".weight").Order(StringComparer.Ordinal));
        double largest = 0;
        foreach (var module in adapter.Modules)
        {
            var layer = module.Layer;
            Assert.True(layer.HasMergedWeight, module.Name);
            Assert.Equal(DType.F32, layer.Weight.DType);
            var actual = new ReadOnlySpan<float>(layer.Weight.Data, layer.Weight.Rows * layer.Weight.Cols);
            largest = Math.Max(largest, Compare.Close("lora_merged_weights", $"merged {module.Name}", actual, reference.Get(module.Name + ".weight").ToFloatArray()));
        }
        output.WriteLine($"merged weights: largest ratio {largest:E3}");

        // The run-time adapter on the shared base leaves the base layers mapped.
        var runtime = LoraGoldenData.BaseModel.LoadAdapter(LoraGoldenData.AdapterDirectory("lora"));
        Assert.All(runtime.Modules, m => Assert.False(m.Layer.HasMergedWeight));
    }

    [Fact]
    public void A_bf16_base_merges_into_bf16_weights_rounded_from_the_fp32_sum()
    {
        string bf16 = Path.Combine(LoraGoldenData.BaseDirectory, "bf16");
        string tokenizer = Path.Combine(LoraGoldenData.BaseDirectory, "tokenizer.model");
        using var merged = PaliGemmaModel.Load(bf16, new PaliGemmaLoadOptions { TokenizerPath = tokenizer, MergeAdapterDirectory = LoraGoldenData.AdapterDirectory("lora") });
        CheckMergedInBaseDType(merged, bf16, DType.BF16);

        // Merged and run time differ only by the bf16 rounding of W + s·B·A: the same tokens, and the merged logits are
        // much nearer the run-time ones than the base model's are (the adapter's effect survives the rounding).
        using var baseModel = PaliGemmaModel.Load(bf16, tokenizer);
        const string sample = "s1_caption";
        var options = new GenerationOptions { MaxNewTokens = LoraGoldenData.MaxNewTokens(sample), KeepStepLogits = true };
        float[] pixels = LoraGoldenData.PixelValues(sample);
        int[] ids = LoraGoldenData.InputIds(sample);
        var fromMerged = new PaliGemmaGenerator(merged).GenerateFromIds(pixels, [ids], options)[0];
        var fromRuntime = new PaliGemmaGenerator(baseModel).GenerateFromIds(pixels, [ids],
            options with { Adapter = baseModel.LoadAdapter(LoraGoldenData.AdapterDirectory("lora")) })[0];
        var fromBase = new PaliGemmaGenerator(baseModel).GenerateFromIds(pixels, [ids], options)[0];
        Assert.Equal(fromRuntime.GeneratedIds, fromMerged.GeneratedIds);
        double mergedGap = Compare.MaxRatio(fromMerged.StepLogits![0], fromRuntime.StepLogits![0]);
        double adapterEffect = Compare.MaxRatio(fromBase.StepLogits![0], fromRuntime.StepLogits[0]);
        output.WriteLine($"bf16 first-step logits: merged vs run time {mergedGap:E3}, base vs run time {adapterEffect:E3}");
        Assert.True(mergedGap < 0.1 * adapterEffect, $"merged vs run time {mergedGap:E3} is not much below the adapter's effect {adapterEffect:E3}");
    }

    [Fact]
    public void An_f16_base_merges_into_f16_weights_rounded_from_the_fp32_sum()
    {
        // A synthetic f16 checkpoint with tiny-mqa-56's shapes, so the golden adapter fits it.
        string dir = Path.Combine(Path.GetTempPath(), "paligemma-lora-f16-" + Guid.NewGuid().ToString("N"));
        try
        {
            PaliGemma.CpuOnly.Model.Synthesis.SyntheticCheckpoint.Write(Path.Combine(LoraGoldenData.BaseDirectory, "config.json"), dir,
                new PaliGemma.CpuOnly.Model.Synthesis.SyntheticCheckpointOptions { DType = DType.F16, Seed = 3 });
            using var merged = PaliGemmaModel.Load(dir, new PaliGemmaLoadOptions { MergeAdapterDirectory = LoraGoldenData.AdapterDirectory("lora") });
            CheckMergedInBaseDType(merged, dir, DType.F16);
        }
        finally
        {
            Directory.Delete(dir, recursive: true);
        }
    }

    /// <summary>
    /// Every merged weight is stored in <paramref name="dtype"/> and equals, bit for bit, round(W + s·(B·A)) computed in
    /// fp32 as PEFT does (the product summed over the rank in order, scaled, added to the widened W).
    /// </summary>
    private static unsafe void CheckMergedInBaseDType(PaliGemmaModel merged, string baseDirectory, DType dtype)
    {
        using var baseWeights = SafetensorsCheckpoint.Open(baseDirectory);
        int changed = 0, total = 0;
        foreach (var module in merged.MergedAdapter!.Modules)
        {
            var layer = module.Layer;
            Assert.True(layer.HasMergedWeight, module.Name);
            Assert.Equal(dtype, layer.Weight.DType);
            var stored = baseWeights.Get(module.Name + ".weight");
            Assert.Equal(dtype, stored.DType);
            float[] w = stored.ToFloatArray();
            int rows = module.OutFeatures, cols = module.InFeatures, rank = module.Rank;
            var actual = new ReadOnlySpan<ushort>(layer.Weight.Data, rows * cols);
            var baseBits = new ReadOnlySpan<ushort>(stored.Pointer, rows * cols);
            for (int n = 0; n < rows; n++)
            for (int k = 0; k < cols; k++)
            {
                float delta = 0;
                for (int j = 0; j < rank; j++) delta = module.A[j * cols + k] * module.BTransposed[j * rows + n] + delta;
                float sum = w[n * cols + k] + delta * module.Scaling;
                ushort expected = dtype == DType.BF16 ? RoundToBFloat16(sum) : BitConverter.HalfToUInt16Bits((Half)sum);
                int i = n * cols + k;
                if (actual[i] != expected)
                    Assert.Fail($"{module.Name}[{n}, {k}]: merged 0x{actual[i]:X4}, expected 0x{expected:X4} (fp32 sum {sum:R}, base 0x{baseBits[i]:X4})");
                if (actual[i] != baseBits[i]) changed++;
                total++;
            }
        }
        // The adapter is not lost to rounding: most weights change.
        Assert.True(changed > total / 2, $"only {changed} of {total} merged weights differ from the base");
    }

    private static ushort RoundToBFloat16(float value)
    {
        uint bits = BitConverter.SingleToUInt32Bits(value);
        return (ushort)((bits + 0x7FFFu + ((bits >> 16) & 1u)) >> 16);
    }

    [Theory]
    [MemberData(nameof(MergedSamples))]
    public void Merged_and_runtime_modes_agree(string sample)
    {
        float[] pixels = LoraGoldenData.PixelValues(sample);
        int[] ids = LoraGoldenData.InputIds(sample);
        var options = new GenerationOptions { MaxNewTokens = LoraGoldenData.MaxNewTokens(sample), KeepStepLogits = true };
        var baseModel = LoraGoldenData.BaseModel;
        var runtime = new PaliGemmaGenerator(baseModel).GenerateFromIds(pixels, [ids],
            options with { Adapter = baseModel.LoadAdapter(LoraGoldenData.AdapterDirectory("lora")) })[0];
        var merged = new PaliGemmaGenerator(LoraGoldenData.MergedModel).GenerateFromIds(pixels, [ids], options)[0];
        Assert.Equal(runtime.GeneratedIds, merged.GeneratedIds);
        for (int s = 0; s < runtime.StepLogits!.Count; s++)
            Compare.Close("lora_merged_vs_runtime", $"{sample} step {s}", merged.StepLogits![s], runtime.StepLogits[s]);
    }

    [Fact]
    public void One_base_model_serves_several_adapters_alternately()
    {
        const string sample = "s1_caption";
        var model = LoraGoldenData.BaseModel;
        int[] ids = LoraGoldenData.InputIds(sample);
        float[] pixels = LoraGoldenData.PixelValues(sample);
        var baseSample = GoldenData.Sample(LoraGoldenData.BaseCase, sample);
        // (adapter, reference ids, reference step logits); null = the base model itself.
        var requests = new (LoraAdapter? Adapter, string Ids, string StepLogits)[]
        {
            (model.LoadAdapter(LoraGoldenData.AdapterDirectory("lora")), LoraGoldenData.FilePath("lora", sample, "generated_ids"), LoraGoldenData.FilePath("lora", sample, "step_logits")),
            (null, baseSample.FilePath("generated_ids"), baseSample.FilePath("step_logits")),
            (model.LoadAdapter(LoraGoldenData.AdapterDirectory("rslora")), LoraGoldenData.FilePath("rslora", sample, "generated_ids"), LoraGoldenData.FilePath("rslora", sample, "step_logits")),
            (model.LoadAdapter(LoraGoldenData.AdapterDirectory("alpha2")), LoraGoldenData.FilePath("alpha2", sample, "generated_ids"), LoraGoldenData.FilePath("alpha2", sample, "step_logits")),
        };
        int vocab = model.Decoder.VocabSize, steps = LoraGoldenData.MaxNewTokens(sample);
        var sessions = requests.Select(r => new PaliGemmaSession(model, 1, ids.Length + steps, r.Adapter)).ToArray();
        var logits = requests.Select(_ => new float[vocab]).ToArray();
        var generated = requests.Select(_ => new List<int>()).ToArray();
        var expectedLogits = requests.Select(r => Npy.Read(r.StepLogits).ToFloat32()).ToArray();

        // Every request advances one step in turn, so adapters switch between consecutive forwards of the same model.
        for (int i = 0; i < requests.Length; i++)
            sessions[i].Prefill(ids, default, ids.Length, model.EncodeImages(pixels, 1, null, default, requests[i].Adapter), logits[i]);
        for (int step = 0; step < steps; step++)
        {
            for (int i = 0; i < requests.Length; i++)
            {
                Compare.Close("lora_step_logits", $"request {i} step {step}", logits[i], expectedLogits[i].AsSpan(step * vocab, vocab));
                int next = System.Numerics.Tensors.TensorPrimitives.IndexOfMax(logits[i]);
                generated[i].Add(next);
                if (step + 1 < steps) sessions[i].Decode([next], logits[i]);
            }
        }
        for (int i = 0; i < requests.Length; i++)
            Assert.Equal(Npy.Read(requests[i].Ids).ToInt64().Select(x => (int)x), generated[i]);
    }

    [Fact]
    public void Probe_layers_reproduce_the_reference_lora_outputs()
    {
        var model = LoraGoldenData.BaseModel;
        var adapter = model.LoadAdapter(LoraGoldenData.AdapterDirectory("lora"));
        foreach (var probe in LoraGoldenData.CaseJson.GetProperty("probes").EnumerateArray())
        {
            string name = probe.GetProperty("module").GetString()!;
            var files = probe.GetProperty("files");
            var module = adapter.Modules.Single(m => m.Name == name);
            float[] x = LoraGoldenData.Floats(files.GetProperty("input").GetString()!);
            int rows = x.Length / module.InFeatures;
            var y = new float[rows * module.OutFeatures];
            module.Layer.Forward(x, rows, y);
            Compare.Close("lora_probe_base", $"{name} base", y, LoraGoldenData.Floats(files.GetProperty("base_layer_output").GetString()!));
            module.Layer.Forward(x, rows, y, adapter);
            Report(name, "probe", Compare.Close("lora_probe", $"{name} with LoRA", y, LoraGoldenData.Floats(files.GetProperty("output").GetString()!)));
        }
    }

    [Fact]
    public void The_low_rank_path_does_not_allocate_per_call()
    {
        var model = LoraGoldenData.BaseModel;
        var adapter = model.LoadAdapter(LoraGoldenData.AdapterDirectory("lora"));
        var module = adapter.Modules.First(m => m.Name.StartsWith("language_model.", StringComparison.Ordinal));
        var x = new float[module.InFeatures];
        for (int i = 0; i < x.Length; i++) x[i] = MathF.Sin(i);
        var y = new float[module.OutFeatures];
        var baseOnly = new float[module.OutFeatures];
        module.Layer.Forward(x, 1, baseOnly);
        module.Layer.Forward(x, 1, y, adapter);   // warm the scratch pool
        long before = GC.GetAllocatedBytesForCurrentThread();
        for (int i = 0; i < 16; i++) module.Layer.Forward(x, 1, y, adapter);
        Assert.Equal(0, GC.GetAllocatedBytesForCurrentThread() - before);
        Assert.NotEqual(baseOnly, y);   // the adapter did change the output
    }

    [Fact]
    public void Adapters_load_once_per_folder_and_belong_to_their_model()
    {
        var model = LoraGoldenData.BaseModel;
        string dir = LoraGoldenData.AdapterDirectory("lora");
        var a = model.LoadAdapter(dir);
        Assert.Same(a, model.LoadAdapter(dir + Path.DirectorySeparatorChar));
        Assert.Same(a, model.LoadAdapter(Path.Combine(dir, "..", Path.GetFileName(dir))));
        Assert.NotSame(a, model.LoadAdapter(LoraGoldenData.AdapterDirectory("rslora")));

        var merged = LoraGoldenData.MergedModel;
        var e = Assert.Throws<ArgumentException>(() => new PaliGemmaSession(merged, 1, 8, a));
        Assert.Contains("another model", e.Message);
        e = Assert.Throws<ArgumentException>(() => merged.EncodeImages(LoraGoldenData.PixelValues("s1_caption"), 1, null, default, merged.MergedAdapter));
        Assert.Contains("already merged", e.Message);
    }

    private void Report(string sample, string what, double ratio) => output.WriteLine($"{sample} {what}: {ratio:E3}");
}
