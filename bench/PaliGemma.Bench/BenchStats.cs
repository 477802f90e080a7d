namespace PaliGemma.Bench;

/// <summary>What every comparison table prints beside its timings.</summary>
internal static class BenchStats
{
    /// <summary>The median of <paramref name="values"/> (sorted in place).</summary>
    public static double Median(List<double> values)
    {
        values.Sort();
        int n = values.Count;
        return n % 2 == 1 ? values[n / 2] : (values[n / 2 - 1] + values[n / 2]) / 2;
    }

    /// <summary>The 1, 5 and 15-minute load averages, or "n/a" where /proc/loadavg cannot be read.</summary>
    public static string LoadAverage()
    {
        try { return string.Join(" ", File.ReadAllText("/proc/loadavg").Split(' ').Take(3)); }
        catch (IOException) { return "n/a"; }
        catch (UnauthorizedAccessException) { return "n/a"; }
    }
}
