using System.Text.Json;
using System.Text.Json.Nodes;
using PaliGemma.CpuOnly.Model;
using PaliGemma.CpuOnly.Tensors;
using PaliGemma.CpuOnly.Tests.Golden;

namespace PaliGemma.CpuOnly.Tests.Lora;

/// <summary>tests/golden-lora: PEFT adapters over tests/golden/tiny-mqa-56 and their reference outputs.</summary>
public static class LoraGoldenData
{
    public const string Case = "tiny-mqa-56-lora";
    public const string BaseCase = "tiny-mqa-56";

    public static string Root => Path.Combine(TestPaths.RepoRoot, "tests", "golden-lora");
    public static string CaseDirectory => Path.Combine(Root, Case);
    public static string BaseDirectory => Path.Combine(TestPaths.Golden, BaseCase);

    private static readonly Lazy<JsonElement> s_caseJson = new(() =>
        JsonDocument.Parse(File.ReadAllText(Path.Combine(CaseDirectory, "cases.json"))).RootElement.Clone());

    public static JsonElement CaseJson => s_caseJson.Value;

    /// <summary>Adapter folder of the main adapter ("lora") or a variant ("rslora", "alpha2").</summary>
    public static string AdapterDirectory(string variant) => variant == "lora"
        ? Path.Combine(CaseDirectory, CaseJson.GetProperty("adapter_dir").GetString()!)
        : Path.Combine(CaseDirectory, Variant(variant).GetProperty("adapter_dir").GetString()!);

    public static JsonElement Variant(string name) =>
        CaseJson.GetProperty("variants").EnumerateArray().Single(v => v.GetProperty("name").GetString() == name);

    public static JsonElement Sample(string name) =>
        CaseJson.GetProperty("samples").EnumerateArray().Single(s => s.GetProperty("name").GetString() == name);

    /// <summary>Reference file names of one sample for a variant ("lora" = run-time main adapter, "merged", "rslora", "alpha2").</summary>
    public static JsonElement Files(string variant, string sample) => variant switch
    {
        "lora" => Sample(sample).GetProperty("files"),
        "merged" => CaseJson.GetProperty("merged").GetProperty("samples").EnumerateArray()
            .Single(s => s.GetProperty("sample").GetString() == sample).GetProperty("files"),
        _ => Variant(variant).GetProperty("samples").EnumerateArray()
            .Single(s => s.GetProperty("sample").GetString() == sample).GetProperty("files"),
    };

    public static string FilePath(string variant, string sample, string key) =>
        Path.Combine(CaseDirectory, Files(variant, sample).GetProperty(key).GetString()!);

    public static NpyArray Npy(string file) => PaliGemma.CpuOnly.Tensors.Npy.Read(Path.Combine(CaseDirectory, file));
    public static float[] Floats(string file) => Npy(file).ToFloat32();

    public static float[] PixelValues(string sample) => Floats(Sample(sample).GetProperty("files").GetProperty("pixel_values").GetString()!);
    public static int[] InputIds(string sample) =>
        Npy(Sample(sample).GetProperty("files").GetProperty("input_ids").GetString()!).ToInt64().Select(x => (int)x).ToArray();
    public static int MaxNewTokens(string sample) => Sample(sample).GetProperty("max_new_tokens").GetInt32();

    /// <summary>The shared base model (the same instance the golden tests use; run-time adapters never change it).</summary>
    public static PaliGemmaModel BaseModel => GoldenData.Model(BaseCase);

    private static readonly Lazy<PaliGemmaModel> s_merged = new(() => PaliGemmaModel.Load(BaseDirectory,
        new PaliGemmaLoadOptions { MergeAdapterDirectory = AdapterDirectory("lora") }));

    /// <summary>tiny-mqa-56 with the main adapter merged at load.</summary>
    public static PaliGemmaModel MergedModel => s_merged.Value;

    /// <summary>A fresh temporary folder holding a copy of an adapter folder, to be changed by a test.</summary>
    public static TempAdapter CopyAdapter(string variant = "lora") => new(AdapterDirectory(variant));
}

/// <summary>A writable copy of an adapter folder in a temporary directory, deleted on dispose.</summary>
public sealed class TempAdapter : IDisposable
{
    public TempAdapter(string source)
    {
        Directory = Path.Combine(Path.GetTempPath(), "paligemma-lora-" + Guid.NewGuid().ToString("N"));
        System.IO.Directory.CreateDirectory(Directory);
        foreach (string file in System.IO.Directory.GetFiles(source))
            File.Copy(file, Path.Combine(Directory, Path.GetFileName(file)));
    }

    public string Directory { get; }
    public string ConfigPath => Path.Combine(Directory, "adapter_config.json");
    public string WeightsPath => Path.Combine(Directory, "adapter_model.safetensors");

    /// <summary>Changes adapter_config.json.</summary>
    public TempAdapter EditConfig(Action<JsonObject> edit)
    {
        var json = JsonNode.Parse(File.ReadAllText(ConfigPath))!.AsObject();
        edit(json);
        File.WriteAllText(ConfigPath, json.ToJsonString());
        return this;
    }

    /// <summary>
    /// Rewrites adapter_model.safetensors: <paramref name="rename"/> maps each tensor name to a new one (null drops it);
    /// <paramref name="extra"/> adds tensors.
    /// </summary>
    public TempAdapter RewriteTensors(Func<string, string?> rename, IEnumerable<(string Name, long[] Shape, float[] Values)>? extra = null,
        DType dtype = DType.F32)
    {
        var writer = new SafetensorsWriter(new Dictionary<string, string> { ["format"] = "pt" });
        using (var file = SafetensorsFile.Open(WeightsPath))
        {
            foreach (string name in file.TensorNames)
            {
                if (rename(name) is not { } newName) continue;
                var tensor = file.Get(name);
                writer.Add(newName, dtype, tensor.Shape, Encode(tensor.ToFloatArray(), dtype));
            }
        }
        foreach (var (name, shape, values) in extra ?? []) writer.Add(name, dtype, shape, Encode(values, dtype));
        writer.WriteTo(WeightsPath);
        return this;
    }

    private static byte[] Encode(float[] values, DType dtype)
    {
        switch (dtype)
        {
            case DType.F32:
                return System.Runtime.InteropServices.MemoryMarshal.AsBytes(values.AsSpan()).ToArray();
            case DType.BF16:
                var bytes = new byte[values.Length * 2];
                for (int i = 0; i < values.Length; i++)
                {
                    uint bits = BitConverter.SingleToUInt32Bits(values[i]);
                    bits += 0x7FFF + ((bits >> 16) & 1);   // round to nearest even
                    BitConverter.TryWriteBytes(bytes.AsSpan(i * 2), (ushort)(bits >> 16));
                }
                return bytes;
            default:
                throw new NotSupportedException(dtype.ToString());
        }
    }

    public void Dispose()
    {
        try { System.IO.Directory.Delete(Directory, recursive: true); } catch (IOException) { }
    }
}
