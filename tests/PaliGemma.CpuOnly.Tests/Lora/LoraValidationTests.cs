using System.Text.Json.Nodes;
using PaliGemma.CpuOnly.Model;
using PaliGemma.CpuOnly.Model.Lora;
using PaliGemma.CpuOnly.Tensors;
using PaliGemma.CpuOnly.Tests.Golden;

namespace PaliGemma.CpuOnly.Tests.Lora;

/// <summary>Adapter folders built in temporary directories: unsupported settings are refused by name, both name layouts load.</summary>
public sealed class LoraValidationTests
{
    private const string TextQ0 = "base_model.model.language_model.model.layers.0.self_attn.q_proj";
    private const string TextDown0 = "base_model.model.language_model.model.layers.0.mlp.down_proj";
    private static readonly string[] SevenTargets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"];

    private static PaliGemmaModel Model => LoraGoldenData.BaseModel;

    private static InvalidDataException Refused(TempAdapter adapter)
    {
        using (adapter)
            return Assert.Throws<InvalidDataException>(() => LoraAdapter.Load(adapter.Directory, Model));
    }

    private static void AssertNames(Exception e, params string[] parts)
    {
        foreach (string part in parts) Assert.Contains(part, e.Message);
    }

    public static TheoryData<string, string> UnsupportedFields() => new()
    {
        { "use_dora", "true" },
        { "fan_in_fan_out", "true" },
        { "modules_to_save", "[\"lm_head\"]" },
        { "bias", "\"all\"" },
        { "bias", "\"lora_only\"" },
        { "peft_type", "\"IA3\"" },
        { "layers_to_transform", "[0]" },
        { "layers_pattern", "\"layers\"" },
        { "layer_replication", "[[0, 1]]" },
        { "lora_bias", "true" },
        { "exclude_modules", "[\"k_proj\"]" },
        { "some_future_option", "{\"enabled\": true}" },
        { "r", "0" },
        { "lora_alpha", "\"eight\"" },
        { "target_modules", "\"foo_proj\"" },
        { "target_modules", "\"q_proj(\"" },
        { "target_modules", "[\"q_proj\", \"k_proj\", \"v_proj\", \"o_proj\", \"gate_proj\", \"up_proj\", \"down_proj\", \"embed_tokens\"]" },
        { "target_modules", "[\"q_proj\", \"k_proj\", \"v_proj\", \"o_proj\", \"gate_proj\", \"up_proj\", \"down_proj\", \"lm_head\"]" },
        { "target_modules", "[\"q_proj\", \"k_proj\", \"v_proj\", \"o_proj\", \"gate_proj\", \"up_proj\", \"down_proj\", \"patch_embedding\"]" },
        { "target_modules", "null" },
        { "rank_pattern", "{\"q_proj(\": 4}" },
        { "alpha_pattern", "[2]" },
    };

    [Theory]
    [MemberData(nameof(UnsupportedFields))]
    public void Unsupported_config_values_are_refused_by_field_name(string field, string json)
    {
        var e = Refused(LoraGoldenData.CopyAdapter().EditConfig(c => c[field] = JsonNode.Parse(json)));
        AssertNames(e, $"'{field}'", "adapter_config.json");
    }

    [Fact]
    public void Missing_required_fields_are_refused_by_name()
    {
        foreach (string field in new[] { "peft_type", "r", "lora_alpha", "target_modules" })
            AssertNames(Refused(LoraGoldenData.CopyAdapter().EditConfig(c => c.Remove(field))), $"'{field}'");
    }

    [Fact]
    public void Fields_that_do_not_change_inference_or_are_unset_are_accepted()
    {
        using var adapter = LoraGoldenData.CopyAdapter().EditConfig(c =>
        {
            c["some_future_option"] = null;
            c["another_future_list"] = new JsonArray();
            c["lora_dropout"] = 0.1;
            c["task_type"] = null;
            c["modules_to_save"] = new JsonArray();
        });
        Assert.Equal(20, LoraAdapter.Load(adapter.Directory, Model).Modules.Count);
    }

    [Fact]
    public void LoRA_tensors_on_embeddings_and_lm_head_are_refused_by_tensor_name()
    {
        string embedding = "base_model.model.language_model.model.embed_tokens.lora_embedding_A";
        var e = Refused(LoraGoldenData.CopyAdapter().RewriteTensors(n => n, [(embedding, [4, 2300], new float[4 * 2300])]));
        AssertNames(e, embedding, "embeddings", "adapter_model.safetensors");

        string head = "base_model.model.language_model.lm_head.lora_A.weight";
        e = Refused(LoraGoldenData.CopyAdapter().RewriteTensors(n => n, [(head, [4, 64], new float[4 * 64])]));
        AssertNames(e, head, "lm_head");

        string conv = "base_model.model.vision_tower.vision_model.embeddings.patch_embedding.lora_A.weight";
        e = Refused(LoraGoldenData.CopyAdapter().RewriteTensors(n => n, [(conv, [4, 3, 14, 14], new float[4 * 3 * 14 * 14])]));
        AssertNames(e, conv, "Conv2d");
    }

    [Fact]
    public void Other_stray_tensors_are_refused_by_name()
    {
        foreach (string stray in new[]
        {
            TextQ0 + ".lora_magnitude_vector",
            TextQ0 + ".lora_B.bias",
            "base_model.model.language_model.lm_head.modules_to_save.default.weight",
            TextQ0 + ".lora_A.default.weight",
            "language_model.model.layers.0.self_attn.q_proj.lora_A.weight",
            "base_model.model.text_model.layers.0.self_attn.q_proj.lora_A.weight",
        })
        {
            var e = Refused(LoraGoldenData.CopyAdapter().RewriteTensors(n => n, [(stray, [4], new float[4])]));
            AssertNames(e, stray);
        }
    }

    [Fact]
    public void Tensors_that_do_not_fit_the_base_model_are_refused_by_tensor_and_file()
    {
        // A layer the model does not have.
        var e = Refused(LoraGoldenData.CopyAdapter().RewriteTensors(n => n.Replace("model.layers.1.", "model.layers.7.")));
        AssertNames(e, "base_model.model.language_model.model.layers.7.", "does not exist", "adapter_model.safetensors");

        // B missing for one module.
        e = Refused(LoraGoldenData.CopyAdapter().RewriteTensors(n => n == TextDown0 + ".lora_B.weight" ? null : n));
        AssertNames(e, TextDown0 + ".lora_B.weight", "missing", "adapter_model.safetensors");

        // The rank a module is configured with does not match its tensors.
        e = Refused(LoraGoldenData.CopyAdapter().EditConfig(c => c["rank_pattern"] = new JsonObject { ["down_proj"] = 8 }));
        AssertNames(e, "mlp.down_proj.lora_A.weight", "[4, 150]", "[8, 150]", "adapter_model.safetensors");

        // A tensor for a module that target_modules does not select.
        e = Refused(LoraGoldenData.CopyAdapter().EditConfig(c => c["target_modules"] = new JsonArray("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj")));
        AssertNames(e, "down_proj.lora_", "target_modules");

        // Wrong shape for the base layer (A of q_proj with the wrong input width).
        e = Refused(LoraGoldenData.CopyAdapter().RewriteTensors(n => n == TextQ0 + ".lora_A.weight" ? null : n,
            [(TextQ0 + ".lora_A.weight", [4, 63], new float[4 * 63])]));
        AssertNames(e, TextQ0 + ".lora_A.weight", "[4, 63]", "[4, 64]");
    }

    [Fact]
    public void All_linear_selects_every_dense_layer_but_the_lm_head_so_this_adapter_lacks_some()
    {
        // "all-linear" also selects SigLIP's out_proj / fc1 / fc2 and the projector, which this adapter has no tensors for.
        var e = Refused(LoraGoldenData.CopyAdapter().EditConfig(c => c["target_modules"] = "all-linear"));
        AssertNames(e, "base_model.model.vision_tower.vision_model.encoder.layers.0.self_attn.out_proj.lora_", "missing");
    }

    [Fact]
    public void Missing_files_are_reported_with_their_paths()
    {
        using (var adapter = LoraGoldenData.CopyAdapter())
        {
            File.Delete(adapter.ConfigPath);
            var e = Assert.Throws<FileNotFoundException>(() => LoraAdapter.Load(adapter.Directory, Model));
            Assert.Contains("adapter_config.json", e.Message);
        }
        using (var adapter = LoraGoldenData.CopyAdapter())
        {
            File.Move(adapter.WeightsPath, Path.Combine(adapter.Directory, "adapter_model.bin"));
            var e = Assert.Throws<InvalidDataException>(() => LoraAdapter.Load(adapter.Directory, Model));
            Assert.Contains("adapter_model.bin", e.Message);
        }
        Assert.Throws<DirectoryNotFoundException>(() => LoraAdapter.Load(Path.Combine(Path.GetTempPath(), "no-such-adapter-" + Guid.NewGuid()), Model));
        Assert.Throws<DirectoryNotFoundException>(() => PaliGemmaModel.Load(LoraGoldenData.BaseDirectory,
            new PaliGemmaLoadOptions { MergeAdapterDirectory = Path.Combine(Path.GetTempPath(), "no-such-adapter-" + Guid.NewGuid()) }));
    }

    /// <summary>transformers 4.52+ module paths: base_model.model.model.language_model... / model.vision_tower...</summary>
    private static string ToRestructured(string name) => name
        .Replace("base_model.model.language_model.model.", "base_model.model.model.language_model.")
        .Replace("base_model.model.vision_tower.", "base_model.model.model.vision_tower.");

    [Fact]
    public void Both_tensor_name_layouts_load_and_give_the_same_results()
    {
        using var restructured = LoraGoldenData.CopyAdapter().RewriteTensors(ToRestructured);
        var classic = Model.LoadAdapter(LoraGoldenData.AdapterDirectory("lora"));
        var renamed = LoraAdapter.Load(restructured.Directory, Model);
        Assert.Equal(LoraNameLayout.Restructured, renamed.Layout);
        Assert.Equal(classic.Modules.Select(m => m.Name), renamed.Modules.Select(m => m.Name));
        Assert.Equal(PrefixLogits(classic), PrefixLogits(renamed));

        // A regex target_modules is matched against the layout's own names (whole-path match, as PEFT's re.fullmatch).
        using var regex = LoraGoldenData.CopyAdapter().RewriteTensors(ToRestructured).EditConfig(c => c["target_modules"] =
            @"model\.(language_model\.layers\.\d+\.(self_attn\.[qkvo]_proj|mlp\.(gate|up|down)_proj)|vision_tower\.vision_model\.encoder\.layers\.\d+\.self_attn\.[qkv]_proj)");
        Assert.Equal(20, LoraAdapter.Load(regex.Directory, Model).Modules.Count);
        // The same regex does not fit the classic names.
        var e = Refused(LoraGoldenData.CopyAdapter().EditConfig(c => c["target_modules"] = @"model\.language_model\.layers\.\d+\..*_proj"));
        AssertNames(e, "'target_modules'");

        // One file mixing the layouts is refused.
        e = Refused(LoraGoldenData.CopyAdapter().RewriteTensors(n => n.Contains("vision_tower") ? ToRestructured(n) : n));
        AssertNames(e, "base_model.model.", "layout");
    }

    [Fact]
    public void Rank_and_alpha_patterns_override_r_and_lora_alpha_per_module()
    {
        // r = 8 everywhere except where rank_pattern says 4 (all seven targets); alpha 8 except alpha_pattern 2:
        // the same numbers as the alpha2 variant (scaling 0.5).
        using var adapter = LoraGoldenData.CopyAdapter().EditConfig(c =>
        {
            c["r"] = 8;
            var ranks = new JsonObject();
            var alphas = new JsonObject();
            foreach (string t in SevenTargets)
            {
                ranks[t] = 4;
                alphas[t] = 2;
            }
            c["rank_pattern"] = ranks;
            c["alpha_pattern"] = alphas;
        });
        var loaded = LoraAdapter.Load(adapter.Directory, Model);
        Assert.All(loaded.Modules, m => Assert.Equal((4, 0.5f), (m.Rank, m.Scaling)));
        Compare.Close("lora_prefix_logits", "rank/alpha pattern prefix logits", PrefixLogits(loaded),
            LoraGoldenData.Floats(LoraGoldenData.Files("alpha2", "s1_caption").GetProperty("prefix_logits").GetString()!));

        // A pattern naming a longer path (here the whole path) applies only where it matches: text layer 1's q_proj gets alpha 16.
        using var partial = LoraGoldenData.CopyAdapter().EditConfig(c => c["alpha_pattern"] = new JsonObject { [@"language_model\.model\.layers\.1\.self_attn\.q_proj"] = 16 });
        var p = LoraAdapter.Load(partial.Directory, Model);
        foreach (var m in p.Modules)
            Assert.Equal(m.Name == "language_model.model.layers.1.self_attn.q_proj" ? 4f : 2f, m.Scaling);
    }

    [Fact]
    public void Bf16_adapter_files_are_widened_to_fp32()
    {
        using var adapter = LoraGoldenData.CopyAdapter().RewriteTensors(n => n, dtype: DType.BF16);
        var loaded = LoraAdapter.Load(adapter.Directory, Model);
        using var file = SafetensorsFile.Open(adapter.WeightsPath);
        var module = loaded.Modules.Single(m => m.Name == "language_model.model.layers.0.self_attn.q_proj");
        Assert.Equal(DType.BF16, file.Get(TextQ0 + ".lora_A.weight").DType);
        Assert.Equal(file.Get(TextQ0 + ".lora_A.weight").ToFloatArray(), module.A.ToArray());
        // B is kept transposed ([rank, out]): element [n, j] of the file's [out, rank] tensor is at j·out + n.
        float[] b = file.Get(TextQ0 + ".lora_B.weight").ToFloatArray();
        int rank = module.Rank, outFeatures = module.OutFeatures;
        Assert.Equal(Enumerable.Range(0, b.Length).Select(i => b[i % outFeatures * rank + i / outFeatures]), module.BTransposed.ToArray());
    }

    private static float[] PrefixLogits(LoraAdapter adapter)
    {
        const string sample = "s1_caption";
        int[] ids = LoraGoldenData.InputIds(sample);
        var features = Model.EncodeImages(LoraGoldenData.PixelValues(sample), 1, null, default, adapter);
        var session = new PaliGemmaSession(Model, 1, ids.Length, adapter);
        var logits = new float[ids.Length * Model.Decoder.VocabSize];
        session.Prefill(ids, default, ids.Length, features, logits, new PrefillOptions { AllLogits = true });
        return logits;
    }
}
