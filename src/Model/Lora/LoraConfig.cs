using System.Text.Json;
using System.Text.RegularExpressions;

namespace PaliGemma.CpuOnly.Model.Lora;

/// <summary>
/// The parts of a PEFT <c>adapter_config.json</c> that decide LoRA inference, read and checked. Fields that would change
/// the math in a way this runtime does not implement (DoRA, fan_in_fan_out, trained biases, modules_to_save, layer
/// selection, ...) are rejected with an error naming the field; nothing is silently ignored.
/// </summary>
public sealed class LoraConfig
{
    public const string FileName = "adapter_config.json";

    // Fields that do not change inference (training-time settings, provenance) and may hold any value.
    private static readonly HashSet<string> NoEffectFields = new(StringComparer.Ordinal)
    {
        "base_model_name_or_path", "revision", "task_type", "inference_mode", "init_lora_weights", "lora_dropout",
        "loftq_config", "megatron_config", "megatron_core", "auto_mapping", "eva_config", "corda_config", "runtime_config",
        "peft_version", "qalora_group_size", "ensure_weight_tying",
    };

    private LoraConfig(string path, int rank, double alpha, bool useRsLora, string[]? targetNames, string? targetRegex,
        KeyValuePair<string, int>[] rankPattern, KeyValuePair<string, double>[] alphaPattern)
    {
        Path = path;
        Rank = rank;
        Alpha = alpha;
        UseRsLora = useRsLora;
        TargetModuleNames = targetNames;
        TargetModulesRegex = targetRegex;
        RankPattern = rankPattern;
        AlphaPattern = alphaPattern;
    }

    /// <summary>The adapter_config.json this was read from.</summary>
    public string Path { get; }
    /// <summary><c>r</c>: the default rank.</summary>
    public int Rank { get; }
    /// <summary><c>lora_alpha</c>: the default alpha.</summary>
    public double Alpha { get; }
    /// <summary><c>use_rslora</c>: scaling alpha/sqrt(r) instead of alpha/r.</summary>
    public bool UseRsLora { get; }
    /// <summary><c>target_modules</c> as a list of names (a module matches when its path equals one or ends with "." + one); null for a regex.</summary>
    public IReadOnlyList<string>? TargetModuleNames { get; }
    /// <summary><c>target_modules</c> as a regex string (matched against the whole module path); null for a list.</summary>
    public string? TargetModulesRegex { get; }
    /// <summary><c>rank_pattern</c> in file order: per-module rank overrides keyed by module-path pattern.</summary>
    public IReadOnlyList<KeyValuePair<string, int>> RankPattern { get; }
    /// <summary><c>alpha_pattern</c> in file order.</summary>
    public IReadOnlyList<KeyValuePair<string, double>> AlphaPattern { get; }

    /// <summary>Reads and checks <paramref name="path"/>.</summary>
    /// <exception cref="FileNotFoundException">The file does not exist.</exception>
    /// <exception cref="InvalidDataException">The file is not valid JSON, misses a required field, or sets a field this runtime does not support.</exception>
    public static LoraConfig Load(string path)
    {
        if (!File.Exists(path)) throw new FileNotFoundException($"'{path}': {FileName} not found (a PEFT adapter folder holds adapter_config.json and adapter_model.safetensors)", path);
        JsonDocument document;
        try
        {
            document = JsonDocument.Parse(File.ReadAllText(path));
        }
        catch (JsonException e)
        {
            throw new InvalidDataException($"'{path}': not valid JSON ({e.Message})", e);
        }
        using (document)
            return Parse(path, document.RootElement);
    }

    private static LoraConfig Parse(string path, JsonElement root)
    {
        if (root.ValueKind != JsonValueKind.Object) throw Field(path, "(root)", "must be a JSON object");

        int? rank = null;
        double? alpha = null;
        bool useRsLora = false;
        string? peftType = null;
        string[]? targetNames = null;
        string? targetRegex = null;
        bool hasTargets = false;
        var rankPattern = new List<KeyValuePair<string, int>>();
        var alphaPattern = new List<KeyValuePair<string, double>>();

        foreach (var property in root.EnumerateObject())
        {
            string name = property.Name;
            var value = property.Value;
            switch (name)
            {
                case "peft_type":
                    peftType = value.ValueKind == JsonValueKind.String ? value.GetString() : throw Field(path, name, $"must be a string, got {value.GetRawText()}");
                    break;
                case "r":
                    rank = PositiveInt(path, name, value);
                    break;
                case "lora_alpha":
                    alpha = Number(path, name, value);
                    break;
                case "use_rslora":
                    useRsLora = Bool(path, name, value);
                    break;
                case "target_modules":
                    hasTargets = true;
                    if (value.ValueKind == JsonValueKind.String) targetRegex = value.GetString()!;
                    else if (value.ValueKind == JsonValueKind.Array)
                        targetNames = value.EnumerateArray().Select(e => e.ValueKind == JsonValueKind.String ? e.GetString()! : throw Field(path, name, $"holds {e.GetRawText()}, not a module name")).ToArray();
                    else throw Field(path, name, $"must be a list of module names or a regex string, got {value.GetRawText()}");
                    break;
                case "rank_pattern":
                    foreach (var p in Entries(path, name, value)) rankPattern.Add(new(p.Name, PositiveInt(path, $"{name}.{p.Name}", p.Value)));
                    break;
                case "alpha_pattern":
                    foreach (var p in Entries(path, name, value)) alphaPattern.Add(new(p.Name, Number(path, $"{name}.{p.Name}", p.Value)));
                    break;
                case "use_dora":
                    if (Bool(path, name, value)) throw Field(path, name, "is true: DoRA (weight-decomposed LoRA) uses different math and is not supported");
                    break;
                case "fan_in_fan_out":
                    if (Bool(path, name, value)) throw Field(path, name, "is true: transposed (Conv1D-style) base weights are not supported; PaliGemma's layers are nn.Linear");
                    break;
                case "lora_bias":
                    if (Bool(path, name, value)) throw Field(path, name, "is true: trained LoRA biases are not supported");
                    break;
                case "use_qalora":
                    if (Bool(path, name, value)) throw Field(path, name, "is true: QA-LoRA is not supported");
                    break;
                case "bias":
                    if (value.ValueKind != JsonValueKind.Null && !(value.ValueKind == JsonValueKind.String && value.GetString() == "none"))
                        throw Field(path, name, $"is {value.GetRawText()}: adapters that train biases are not supported (only \"none\")");
                    break;
                case "modules_to_save":
                case "layers_to_transform":
                case "layers_pattern":
                case "layer_replication":
                case "exclude_modules":
                case "trainable_token_indices":
                case "target_parameters":
                case "alora_invocation_tokens":
                    if (!IsEmpty(value)) throw Field(path, name, $"is {Shorten(value.GetRawText())}: {Unsupported(name)}");
                    break;
                default:
                    // A field this loader does not know: harmless when unset, otherwise it might change the math.
                    if (!NoEffectFields.Contains(name) && !IsEmpty(value))
                        throw Field(path, name, $"is {Shorten(value.GetRawText())}: this loader does not know the field, so it cannot honour it");
                    break;
            }
        }

        if (peftType is null) throw Field(path, "peft_type", "is missing");
        if (peftType != "LORA") throw Field(path, "peft_type", $"is \"{peftType}\": only LORA adapters are supported");
        if (rank is null) throw Field(path, "r", "is missing");
        if (alpha is null) throw Field(path, "lora_alpha", "is missing");
        if (!hasTargets || (targetNames is null && targetRegex is null)) throw Field(path, "target_modules", "is missing: the adapted modules cannot be known");
        if (targetRegex is not null && targetRegex != AllLinear)
        {
            try
            {
                _ = new Regex(targetRegex, RegexOptions.CultureInvariant);
            }
            catch (ArgumentException e)
            {
                throw Field(path, "target_modules", $"\"{targetRegex}\" is not a regular expression this runtime can use ({e.Message})");
            }
        }
        foreach (var (field, key) in rankPattern.Select(p => ("rank_pattern", p.Key)).Concat(alphaPattern.Select(p => ("alpha_pattern", p.Key))))
        {
            try
            {
                _ = new Regex($"^(?:.*\\.)?(?:{key})$", RegexOptions.CultureInvariant);
            }
            catch (ArgumentException e)
            {
                throw Field(path, field, $"has the key \"{key}\", which is not a regular expression this runtime can use ({e.Message})");
            }
        }
        return new LoraConfig(path, rank.Value, alpha.Value, useRsLora, targetNames, targetRegex, [.. rankPattern], [.. alphaPattern]);
    }

    /// <summary>PEFT's shorthand for every Linear layer except the output layer.</summary>
    public const string AllLinear = "all-linear";

    /// <summary>Whether <c>target_modules</c> selects <paramref name="modulePath"/> (PEFT's rule: list = exact or "."-suffix match; string = full regex match).</summary>
    internal bool Targets(string modulePath, bool isLinear, bool isOutputLayer)
    {
        if (TargetModuleNames is { } names)
        {
            foreach (string t in names)
                if (modulePath == t || (modulePath.Length > t.Length && modulePath.EndsWith(t, StringComparison.Ordinal) && modulePath[^(t.Length + 1)] == '.'))
                    return true;
            return false;
        }
        if (TargetModulesRegex == AllLinear) return isLinear && !isOutputLayer;
        return Regex.IsMatch(modulePath, $"^(?:{TargetModulesRegex})\\z", RegexOptions.CultureInvariant);
    }

    /// <summary>
    /// Rank and alpha of one module. As PEFT's <c>get_pattern_key</c> (v0.14 on): the first key of rank_pattern (and,
    /// separately, of alpha_pattern) that matches <c>(.*\.)?(key)$</c> from the start of the module path wins, else r /
    /// lora_alpha. (PEFT 0.13 required a "." before the key and looked one key up in both patterns; the two agree on
    /// every pattern set except a full-path key or a rank key shadowing an alpha key.)
    /// </summary>
    public (int Rank, double Alpha) RankAndAlphaFor(string modulePath)
    {
        int rank = Rank;
        double alpha = Alpha;
        foreach (var p in RankPattern)
            if (PatternMatches(p.Key, modulePath)) { rank = p.Value; break; }
        foreach (var p in AlphaPattern)
            if (PatternMatches(p.Key, modulePath)) { alpha = p.Value; break; }
        return (rank, alpha);
    }

    private static bool PatternMatches(string key, string modulePath) =>
        Regex.IsMatch(modulePath, $"^(?:.*\\.)?(?:{key})$", RegexOptions.CultureInvariant);

    /// <summary>alpha / r, or alpha / sqrt(r) with <c>use_rslora</c>, as PEFT computes it (double, then used as fp32).</summary>
    public float Scaling(int rank, double alpha) => (float)(UseRsLora ? alpha / Math.Sqrt(rank) : alpha / rank);

    private static string Unsupported(string field) => field switch
    {
        "modules_to_save" => "adapters that replace whole modules (modules_to_save) are not supported",
        "layers_to_transform" or "layers_pattern" => "adapting only some layers by index is not supported",
        "layer_replication" => "layer replication is not supported",
        "exclude_modules" => "excluding modules from target_modules is not supported",
        "trainable_token_indices" => "trainable token embeddings are not supported",
        "target_parameters" => "LoRA on raw parameters (target_parameters) is not supported",
        _ => "this setting is not supported",
    };

    private static bool IsEmpty(JsonElement value) => value.ValueKind switch
    {
        JsonValueKind.Null or JsonValueKind.False => true,
        JsonValueKind.Array => value.GetArrayLength() == 0,
        JsonValueKind.Object => !value.EnumerateObject().Any(),
        JsonValueKind.String => value.GetString()!.Length == 0,
        _ => false,
    };

    private static IEnumerable<JsonProperty> Entries(string path, string name, JsonElement value) => value.ValueKind switch
    {
        JsonValueKind.Null => [],
        JsonValueKind.Object => value.EnumerateObject().ToArray(),
        _ => throw Field(path, name, $"must be an object of module pattern -> value, got {Shorten(value.GetRawText())}"),
    };

    private static int PositiveInt(string path, string name, JsonElement value) =>
        value.ValueKind == JsonValueKind.Number && value.TryGetInt32(out int v) && v > 0 ? v : throw Field(path, name, $"must be a positive integer, got {value.GetRawText()}");

    private static double Number(string path, string name, JsonElement value) =>
        value.ValueKind == JsonValueKind.Number && double.IsFinite(value.GetDouble()) ? value.GetDouble() : throw Field(path, name, $"must be a number, got {value.GetRawText()}");

    private static bool Bool(string path, string name, JsonElement value) => value.ValueKind switch
    {
        JsonValueKind.True => true,
        JsonValueKind.False or JsonValueKind.Null => false,
        _ => throw Field(path, name, $"must be true or false, got {value.GetRawText()}"),
    };

    private static string Shorten(string text) => text.Length <= 80 ? text : text[..77] + "...";

    internal static InvalidDataException Field(string path, string field, string problem) =>
        new($"'{path}': field '{field}' {problem}");
}
