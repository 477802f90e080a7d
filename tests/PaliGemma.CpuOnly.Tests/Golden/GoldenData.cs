using System.Collections.Concurrent;
using System.Text.Json;
using PaliGemma.CpuOnly.Model;
using PaliGemma.CpuOnly.Tensors;

namespace PaliGemma.CpuOnly.Tests.Golden;

/// <summary>One sample of a golden case's cases.json.</summary>
public sealed class GoldenSample
{
    public required string Case { get; init; }
    public required string Name { get; init; }
    public required JsonElement Json { get; init; }
    /// <summary>The golden folder the case lives in (tests/golden or tests/golden-pg2).</summary>
    public string Root { get; init; } = TestPaths.Golden;
    public string CaseDirectory => Path.Combine(Root, Case);
    public bool IsBatch => Json.TryGetProperty("batch", out var b) && b.GetBoolean();
    public bool IsSuffix => Json.TryGetProperty("suffix_case", out var s) && s.GetBoolean();
    public string[] Images => Json.GetProperty("images").EnumerateArray().Select(e => e.GetString()!).ToArray();
    public string[] Prompts => Json.GetProperty("prompts").EnumerateArray().Select(e => e.GetString()!).ToArray();
    public int MaxNewTokens => Json.GetProperty("max_new_tokens").GetInt32();

    public bool HasFile(string key) => Json.GetProperty("files").TryGetProperty(key, out _);
    public string FilePath(string key) => Path.Combine(CaseDirectory, Json.GetProperty("files").GetProperty(key).GetString()!);
    public NpyArray Npy(string key) => PaliGemma.CpuOnly.Tensors.Npy.Read(FilePath(key));
    public float[] Floats(string key) => Npy(key).ToFloat32();

    public override string ToString() => $"{Case}/{Name}";
}

public static class GoldenData
{
    private static readonly ConcurrentDictionary<string, Lazy<PaliGemmaModel>> Models = new();

    // Every method takes the golden folder; the default is tests/golden (PaliGemma 1), tests/golden-pg2 is the other.
    public static string[] CaseNames => CaseNamesIn(TestPaths.Golden);

    public static string[] CaseNamesIn(string root) =>
        JsonDocument.Parse(File.ReadAllText(Path.Combine(root, "index.json"))).RootElement
            .GetProperty("cases").EnumerateArray().Select(e => e.GetString()!).ToArray();

    public static JsonElement CaseJson(string caseName, string? root = null) =>
        JsonDocument.Parse(File.ReadAllText(Path.Combine(root ?? TestPaths.Golden, caseName, "cases.json"))).RootElement;

    public static IEnumerable<GoldenSample> Samples(string? root = null) =>
        from c in CaseNamesIn(root ?? TestPaths.Golden)
        from s in CaseJson(c, root).GetProperty("samples").EnumerateArray()
        select new GoldenSample { Case = c, Name = s.GetProperty("name").GetString()!, Json = s.Clone(), Root = root ?? TestPaths.Golden };

    public static GoldenSample Sample(string caseName, string sampleName, string? root = null) =>
        Samples(root).Single(s => s.Case == caseName && s.Name == sampleName);

    /// <summary>Models stay loaded for the whole test run (they are immutable and thread-safe).</summary>
    public static PaliGemmaModel Model(string caseName, string variant = "", string? root = null)
    {
        root ??= TestPaths.Golden;
        string key = Path.Combine(root, caseName, variant);
        return Models.GetOrAdd(key, _ => new Lazy<PaliGemmaModel>(() =>
        {
            string dir = Path.Combine(root, caseName, variant);
            return PaliGemmaModel.Load(dir, Path.Combine(root, caseName, "tokenizer.model"));
        })).Value;
    }
}

/// <summary>Relative comparison against reference tensors: max |actual − expected| ≤ tolerance × max |expected|.</summary>
public static class Compare
{
    public const double RelativeTolerance = 1e-4;
    private static readonly ConcurrentDictionary<string, double> Largest = new();

    public static double MaxRatio(ReadOnlySpan<float> actual, ReadOnlySpan<float> expected)
    {
        Assert.Equal(expected.Length, actual.Length);
        double maxDiff = 0, maxRef = 0;
        for (int i = 0; i < expected.Length; i++)
        {
            Assert.False(float.IsNaN(actual[i]), $"NaN at {i}");
            maxDiff = Math.Max(maxDiff, Math.Abs((double)actual[i] - expected[i]));
            maxRef = Math.Max(maxRef, Math.Abs((double)expected[i]));
        }
        return maxRef == 0 ? maxDiff : maxDiff / maxRef;
    }

    /// <summary>Asserts the bound and records the ratio under <paramref name="kind"/> for the report.</summary>
    public static double Close(string kind, string what, ReadOnlySpan<float> actual, ReadOnlySpan<float> expected, double tolerance = RelativeTolerance)
    {
        double ratio = MaxRatio(actual, expected);
        Largest.AddOrUpdate(kind, ratio, (_, old) => Math.Max(old, ratio));
        WriteReport();
        Assert.True(ratio <= tolerance, $"{what}: max |diff| / max |ref| = {ratio:E3} exceeds {tolerance:E1}");
        return ratio;
    }

    private static readonly object ReportLock = new();

    private static void WriteReport()
    {
        lock (ReportLock)
        {
            var lines = Largest.OrderBy(p => p.Key).Select(p => $"{p.Key}\t{p.Value:E3}");
            File.WriteAllLines(Path.Combine(AppContext.BaseDirectory, "golden-ratios.tsv"), lines);
        }
    }
}
