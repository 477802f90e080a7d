namespace PaliGemma.CpuOnly.Tests;

/// <summary>Locates the repository (the folder holding PaliGemma.CpuOnly.sln) and its golden reference data.</summary>
internal static class TestPaths
{
    private const string SolutionFileName = "PaliGemma.CpuOnly.sln";

    private static readonly Lazy<string> s_repoRoot = new(FindRepoRoot);

    /// <summary>The folder holding PaliGemma.CpuOnly.sln, found by walking up from the test assembly's folder.</summary>
    public static string RepoRoot => s_repoRoot.Value;

    /// <summary>tests/golden under <see cref="RepoRoot"/>.</summary>
    public static string Golden => Path.Combine(RepoRoot, "tests", "golden");

    /// <summary>tests/golden-pg2 (PaliGemma 2 references) under <see cref="RepoRoot"/>.</summary>
    public static string GoldenPg2 => Path.Combine(RepoRoot, "tests", "golden-pg2");

    private static string FindRepoRoot()
    {
        string start = AppContext.BaseDirectory;
        for (var directory = new DirectoryInfo(start); directory is not null; directory = directory.Parent)
        {
            if (File.Exists(Path.Combine(directory.FullName, SolutionFileName))) return directory.FullName;
        }

        throw new DirectoryNotFoundException($"no folder at or above '{start}' contains {SolutionFileName}");
    }
}
