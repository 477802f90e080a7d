using System.Text.Json;
using System.Text.Json.Serialization;

namespace PaliGemma.CpuOnly.Tensors;

/// <summary>The parts of <c>model.safetensors.index.json</c> the loader uses (metadata such as total_size is ignored).</summary>
internal sealed class SafetensorsIndexJson
{
    [JsonPropertyName("weight_map")]
    public Dictionary<string, string>? WeightMap { get; set; }
}

/// <summary>Source-generated (reflection-free) serializer for the shard index; duplicate keys are rejected.</summary>
[JsonSourceGenerationOptions(
    AllowDuplicateProperties = false,
    ReadCommentHandling = JsonCommentHandling.Disallow,
    AllowTrailingCommas = false,
    GenerationMode = JsonSourceGenerationMode.Metadata)]
[JsonSerializable(typeof(SafetensorsIndexJson))]
internal sealed partial class SafetensorsIndexJsonContext : JsonSerializerContext
{
}
