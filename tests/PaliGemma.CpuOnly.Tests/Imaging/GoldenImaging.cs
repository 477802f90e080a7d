using System.Text.Json;

namespace PaliGemma.CpuOnly.Tests.Imaging;

/// <summary>One image of one golden sample: where its file and reference tensors are.</summary>
internal sealed record GoldenImage(string Case, string Sample, int Index, int BatchSize, int Size, string ImageFile,
    string PixelValuesFile, string? ResizedFile, string? DecodedFile)
{
    public bool IsJpeg => ImageFile.EndsWith(".jpg", StringComparison.OrdinalIgnoreCase)
        || ImageFile.EndsWith(".jpeg", StringComparison.OrdinalIgnoreCase);

    public override string ToString() => $"{Case}/{Sample}[{Index}] {Path.GetFileName(ImageFile)}";
}

/// <summary>Finds tests/golden and lists every image that a golden sample feeds to the processor.</summary>
internal static class GoldenImaging
{
    private static readonly Lazy<string> s_repositoryRoot = new(FindRepositoryRoot);

    /// <summary>The folder holding PaliGemma.CpuOnly.sln, found by walking up from the test assembly.</summary>
    public static string RepositoryRoot => s_repositoryRoot.Value;

    public static string GoldenDirectory => Path.Combine(RepositoryRoot, "tests", "golden");

    /// <summary>Small PIL-made fixtures kept beside these tests (see Data/make_fixtures.py).</summary>
    public static string FixtureDirectory => Path.Combine(RepositoryRoot, "tests", "PaliGemma.CpuOnly.Tests", "Imaging", "Data");

    public static readonly string[] Cases = ["tiny-mqa-56", "small-mha-84", "long-448"];

    public static IEnumerable<GoldenImage> AllImages()
    {
        foreach (string caseName in Cases)
        {
            string caseDirectory = Path.Combine(GoldenDirectory, caseName);
            using var document = JsonDocument.Parse(File.ReadAllText(Path.Combine(caseDirectory, "cases.json")));
            int size = document.RootElement.GetProperty("config_summary").GetProperty("image_size").GetInt32();
            foreach (JsonElement sample in document.RootElement.GetProperty("samples").EnumerateArray())
            {
                JsonElement files = sample.GetProperty("files");
                if (!files.TryGetProperty("pixel_values", out JsonElement pixelValues))
                {
                    continue;
                }

                string? resized = files.TryGetProperty("resized_uint8_hwc", out JsonElement r) ? r.GetString() : null;
                string[] images = sample.GetProperty("images").EnumerateArray().Select(e => e.GetString()!).ToArray();
                for (int i = 0; i < images.Length; i++)
                {
                    string? decoded = files.TryGetProperty($"decoded_rgb_uint8_hwc_{i}", out JsonElement d) ? d.GetString() : null;
                    yield return new GoldenImage(
                        caseName,
                        sample.GetProperty("name").GetString()!,
                        i,
                        images.Length,
                        size,
                        Path.Combine(caseDirectory, images[i]),
                        Path.Combine(caseDirectory, pixelValues.GetString()!),
                        resized is null ? null : Path.Combine(caseDirectory, resized),
                        decoded is null ? null : Path.Combine(caseDirectory, decoded));
                }
            }
        }
    }

    /// <summary>Item <paramref name="index"/> of a tensor whose first dimension is the batch.</summary>
    public static T[] BatchItem<T>(T[] values, int[] shape, int index, int expectedBatch)
    {
        Assert.True(shape.Length == 4 && shape[0] == expectedBatch,
            $"expected a batch of {expectedBatch} as the first of 4 dimensions, got [{string.Join(", ", shape)}]");
        int itemLength = values.Length / shape[0];
        return values.AsSpan(index * itemLength, itemLength).ToArray();
    }

    private static string FindRepositoryRoot()
    {
        for (var directory = new DirectoryInfo(AppContext.BaseDirectory); directory is not null; directory = directory.Parent)
        {
            if (File.Exists(Path.Combine(directory.FullName, "PaliGemma.CpuOnly.sln")))
            {
                return directory.FullName;
            }
        }

        throw new DirectoryNotFoundException($"No PaliGemma.CpuOnly.sln above '{AppContext.BaseDirectory}'.");
    }
}
