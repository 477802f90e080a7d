using PaliGemma.CpuOnly.Model;
using PaliGemma.CpuOnly.Tests.Golden;

namespace PaliGemma.CpuOnly.Tests.GoldenPg2;

/// <summary>The PaliGemma 2 reference data (tests/golden-pg2) through the same helpers as the PaliGemma 1 data.</summary>
internal static class Pg2Golden
{
    public const string Tiny = "pg2-tiny-56";
    public static string Root => TestPaths.GoldenPg2;

    public static string[] CaseNames => GoldenData.CaseNamesIn(Root);
    public static IEnumerable<GoldenSample> Samples() => GoldenData.Samples(Root);
    public static GoldenSample Sample(string caseName, string sampleName) => GoldenData.Sample(caseName, sampleName, Root);
    public static PaliGemmaModel Model(string caseName, string variant = "") => GoldenData.Model(caseName, variant, Root);
    public static System.Text.Json.JsonElement CaseJson(string caseName) => GoldenData.CaseJson(caseName, Root);

    public static TheoryData<string, string> GenerationSamples()
    {
        var data = new TheoryData<string, string>();
        foreach (var s in Samples().Where(s => !s.IsSuffix)) data.Add(s.Case, s.Name);
        return data;
    }

    /// <summary>Each row's prompt ids without the left padding.</summary>
    public static int[][] PromptRows(GoldenSample sample) => GoldenChecks.PromptRows(sample);
}
