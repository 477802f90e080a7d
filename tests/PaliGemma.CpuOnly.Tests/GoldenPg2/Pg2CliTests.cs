using PaliGemma.CpuOnly.Tests.Cli;

namespace PaliGemma.CpuOnly.Tests.GoldenPg2;

/// <summary><c>paligemma generate</c> on a PaliGemma 2 checkpoint: the decoder is chosen from config.json, no flag.</summary>
[Collection(nameof(ConsoleCollection))]
public sealed class Pg2CliTests
{
    public static TheoryData<string, string> SingleSamples()
    {
        var data = new TheoryData<string, string>();
        foreach (var s in Pg2Golden.Samples().Where(s => !s.IsSuffix && !s.IsBatch)) data.Add(s.Case, s.Name);
        return data;
    }

    [Theory]
    [MemberData(nameof(SingleSamples))]
    public void Generate_json_prints_the_golden_ids(string caseName, string sampleName) =>
        CliTests.GenerateJsonMatchesGolden(Pg2Golden.Sample(caseName, sampleName));
}
