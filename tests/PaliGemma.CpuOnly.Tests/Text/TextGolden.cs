using System.Text.Json;
using PaliGemma.CpuOnly.Model.Text;

namespace PaliGemma.CpuOnly.Tests.Text;

/// <summary>Paths and parsed JSON of the golden text data (tests/golden), found from the test assembly's folder.</summary>
internal static class TextGolden
{
    private static readonly Lazy<string> LazyGoldenDirectory = new(FindGoldenDirectory);
    private static readonly Lazy<PaliGemmaTokenizer> LazyTokenizer = new(() => PaliGemmaTokenizer.Load(TokenizerModelPath));
    private static readonly Lazy<JsonDocument> LazyTokenizerCases = new(() => ParseJson(Path.Combine(GoldenDirectory, "tokenizer_cases.json")));

    public static string GoldenDirectory => LazyGoldenDirectory.Value;

    public static string TokenizerModelPath => Path.Combine(GoldenDirectory, "tokenizer.model");

    /// <summary>Tokenizer loaded once from tests/golden/tokenizer.model (it is immutable).</summary>
    public static PaliGemmaTokenizer Tokenizer => LazyTokenizer.Value;

    public static JsonElement TokenizerCasesRoot => LazyTokenizerCases.Value.RootElement;

    public static JsonElement TokenizerCase(int index) => TokenizerCasesRoot.GetProperty("cases")[index];

    public static int TokenizerCaseCount => TokenizerCasesRoot.GetProperty("cases").GetArrayLength();

    /// <summary>Case folder names listed in index.json.</summary>
    public static string[] ModelCases()
    {
        using JsonDocument index = ParseJson(Path.Combine(GoldenDirectory, "index.json"));
        return index.RootElement.GetProperty("cases").EnumerateArray().Select(e => e.GetString()!).ToArray();
    }

    public static JsonDocument ParseJson(string path) => JsonDocument.Parse(File.ReadAllBytes(path));

    public static int[] Ints(JsonElement array) => array.EnumerateArray().Select(e => e.GetInt32()).ToArray();

    public static string[] Strings(JsonElement array) => array.EnumerateArray().Select(e => e.GetString()!).ToArray();

    private static string FindGoldenDirectory()
    {
        for (DirectoryInfo? directory = new(AppContext.BaseDirectory); directory is not null; directory = directory.Parent)
        {
            if (File.Exists(Path.Combine(directory.FullName, "PaliGemma.CpuOnly.sln")))
            {
                return Path.Combine(directory.FullName, "tests", "golden");
            }
        }

        throw new DirectoryNotFoundException($"No folder above '{AppContext.BaseDirectory}' contains PaliGemma.CpuOnly.sln.");
    }
}
