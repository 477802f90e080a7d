using System.Diagnostics;
using System.Text.Json;
using PaliGemma.Cli;
using PaliGemma.CpuOnly.Tests.Golden;

namespace PaliGemma.CpuOnly.Tests.Cli;

/// <summary><c>paligemma bench --cold-start</c>: the probe line, the medians, the hidden probe command and one real spawn.</summary>
[Collection(nameof(ConsoleCollection))]
public sealed class ColdStartTests
{
    private static string TinyModel => Path.Combine(TestPaths.Golden, "tiny-mqa-56");

    [Fact]
    public void Probe_line_round_trips_through_format_and_parse()
    {
        var reading = new ColdStartReading("NativeAOT", 1_000, 2_500, 9_000, 42, 1.25, 11_000_000, null);
        var parsed = ColdStartReading.Parse("some progress\n" + reading.Format() + "\n");
        Assert.Equal(reading, parsed);
    }

    [Theory]
    [InlineData("no probe here")]
    [InlineData("cold-start-probe runtime=JIT entered=1 ready=2 first_token=3 first_token_id=0 load_ms=1 peak_rss_ready=-1")]
    [InlineData("cold-start-probe runtime=JIT entered=1 ready=2 first_token=3 first_token_id=0 load_ms=x peak_rss_ready=-1 peak_rss=-1")]
    [InlineData("cold-start-probe runtime=JIT entered=1 ready=2 ready=2 first_token=3 first_token_id=0 load_ms=1 peak_rss_ready=-1 peak_rss=-1")]
    [InlineData("cold-start-probe runtime=JIT entered=5 ready=2 first_token=3 first_token_id=0 load_ms=1 peak_rss_ready=-1 peak_rss=-1")]
    [InlineData("cold-start-probe runtime=JIT entered=1 ready=4 first_token=3 first_token_id=0 load_ms=1 peak_rss_ready=-1 peak_rss=-1")]
    public void Parse_rejects_missing_malformed_or_unordered_fields(string output)
    {
        Assert.Throws<InvalidDataException>(() => ColdStartReading.Parse(output));
    }

    [Fact]
    public void Summary_takes_medians_of_times_measured_from_the_spawn()
    {
        long ms = Stopwatch.Frequency / 1000;
        ColdStartRun Run(long spawn, long readyMs, long firstMs, long rss) =>
            new(spawn, spawn + (firstMs + 1) * ms, new ColdStartReading("JIT", spawn + ms, spawn + readyMs * ms, spawn + firstMs * ms, 7, readyMs - 1, rss / 2, rss));
        var summary = ColdStartSummary.From([Run(100 * ms, 30, 90, 400), Run(5_000 * ms, 10, 50, 100), Run(77 * ms, 20, 70, 300), Run(0, 40, 60, 200)]);
        Assert.Equal(4, summary.Runs);
        Assert.Equal(25, summary.StartToReadyMs, 6);
        Assert.Equal(65, summary.StartToFirstTokenMs, 6);
        Assert.Equal(1, summary.StartToMainMs, 6);
        Assert.Equal(24, summary.LoadMs, 6);
        Assert.Equal(250, summary.PeakRssBytes);
        Assert.Equal(125, summary.PeakRssAtReadyBytes);
    }

    [Fact]
    public void Summary_has_no_rss_when_a_run_lacks_it()
    {
        var run = new ColdStartRun(0, 3, new ColdStartReading("JIT", 1, 2, 2, -1, 1, null, null));
        Assert.Null(ColdStartSummary.From([run]).PeakRssBytes);
        Assert.Throws<ArgumentException>(() => ColdStartSummary.From([]));
    }

    [Fact]
    public void Probe_command_loads_the_model_and_reports_the_golden_first_token()
    {
        var sample = GoldenData.Sample("tiny-mqa-56", "s1_caption");
        long before = Stopwatch.GetTimestamp();
        var (code, stdout, stderr) = CliTests.Run(ColdStartCommand.ProbeCommand, "--model", sample.CaseDirectory,
            "--image", Path.Combine(sample.CaseDirectory, sample.Images[0]), "--prompt", sample.Json.GetProperty("prompts")[0].GetString()!);
        Assert.True(code == 0, stderr);
        var reading = ColdStartReading.Parse(stdout);
        Assert.Equal("JIT", reading.Runtime);
        Assert.InRange(reading.EnteredTicks, before, reading.ReadyTicks);
        Assert.True(reading.FirstTokenTicks > reading.ReadyTicks);
        Assert.Equal(sample.Json.GetProperty("generated_ids_list")[0][0].GetInt32(), reading.FirstTokenId);
        Assert.True(reading.LoadMilliseconds > 0);
        if (OperatingSystem.IsLinux()) Assert.True(reading.PeakRssBytes >= reading.PeakRssAtReadyBytes);
    }

    [Fact]
    public void Probe_without_first_token_reports_ready_only()
    {
        var (code, stdout, stderr) = CliTests.Run(ColdStartCommand.ProbeCommand, "--model", TinyModel, "--no-first-token");
        Assert.True(code == 0, stderr);
        var reading = ColdStartReading.Parse(stdout);
        Assert.Equal(-1, reading.FirstTokenId);
        Assert.Equal(reading.ReadyTicks, reading.FirstTokenTicks);
    }

    [Fact]
    public void Cold_start_bench_spawns_the_binary_and_prints_medians_as_json()
    {
        string dll = Path.Combine(AppContext.BaseDirectory, "paligemma.dll");
        var (code, stdout, stderr) = CliTests.Run("bench", "--cold-start", "--model", TinyModel, "--binary", dll, "--runs", "2", "--json", "--quiet");
        Assert.True(code == 0, stderr);
        using var doc = JsonDocument.Parse(stdout);
        var root = doc.RootElement;
        Assert.Equal("JIT", root.GetProperty("runtime").GetString());
        Assert.Equal(2, root.GetProperty("runs").GetInt32());
        Assert.Equal(2, root.GetProperty("runs_detail").GetArrayLength());
        double main = root.GetProperty("start_to_main_ms").GetDouble();
        double ready = root.GetProperty("start_to_ready_ms").GetDouble();
        double first = root.GetProperty("start_to_first_token_ms").GetDouble();
        Assert.True(0 < main && main <= ready && ready < first, $"main {main}, ready {ready}, first token {first}");
        Assert.True(first <= root.GetProperty("start_to_exit_ms").GetDouble());
        // Both children run the same greedy step on the same model.
        var ids = root.GetProperty("runs_detail").EnumerateArray().Select(r => r.GetProperty("first_token_id").GetInt32()).ToArray();
        Assert.Equal(ids[0], ids[1]);
    }

    [Theory]
    [InlineData("--runs", "0")]
    [InlineData("--frobnicate", "1")]
    public void Cold_start_bench_rejects_bad_options(string option, string value)
    {
        var (code, _, stderr) = CliTests.Run("bench", "--cold-start", "--model", TinyModel, option, value);
        Assert.Equal(2, code);
        Assert.Contains(option, stderr);
    }

    [Fact]
    public void Cold_start_bench_names_a_missing_binary()
    {
        var (code, _, stderr) = CliTests.Run("bench", "--cold-start", "--model", TinyModel, "--binary", "/nonexistent/paligemma");
        Assert.Equal(1, code);
        Assert.Contains("/nonexistent/paligemma", stderr);
    }
}
