using System.IO.Compression;
using System.Text.Json;
using PaliGemma.CpuOnly.Model.Tasks;
using PaliGemma.CpuOnly.Tensors;

namespace PaliGemma.CpuOnly.Tests.Tasks.Segmentation;

/// <summary>tests/golden/segmentation: mask_cases.json, the random-weight vae.npz and the decoder loaded once.</summary>
internal static class SegmentationGolden
{
    private static readonly Lazy<MaskDecoder> s_decoder = new(() => MaskDecoder.Load(VaePath));
    private static readonly Lazy<JsonDocument> s_cases = new(() => JsonDocument.Parse(File.ReadAllBytes(Path.Combine(Folder, "mask_cases.json"))));

    public static string Folder => Path.Combine(TestPaths.Golden, "segmentation");

    public static string VaePath => Path.Combine(Folder, "vae.npz");

    /// <summary>Shared by the test classes; <see cref="MaskDecoder.Decode"/> is thread-safe.</summary>
    public static MaskDecoder Decoder => s_decoder.Value;

    public static JsonElement Root => s_cases.Value.RootElement;

    public static JsonElement Case(int index) => Root.GetProperty("cases")[index];

    public static int CaseCount => Root.GetProperty("cases").GetArrayLength();

    public static int[] Codes(JsonElement @case) => @case.GetProperty("codes").EnumerateArray().Select(e => e.GetInt32()).ToArray();

    public static NpyArray ReadNpy(string fileName) => Npy.Read(Path.Combine(Folder, fileName));

    /// <summary>
    /// Writes a copy of vae.npz to <paramref name="path"/>: <paramref name="replace"/> maps each key to its new .npy bytes,
    /// or null to drop the entry; the entries are written with <paramref name="level"/>.
    /// </summary>
    public static void RewriteVae(string path, Func<string, byte[], byte[]?> replace, CompressionLevel level = CompressionLevel.NoCompression)
    {
        using var source = ZipFile.OpenRead(VaePath);
        using var target = ZipFile.Open(path, ZipArchiveMode.Create);
        foreach (ZipArchiveEntry entry in source.Entries)
        {
            byte[] bytes;
            using (var stream = entry.Open())
            using (var buffer = new MemoryStream())
            {
                stream.CopyTo(buffer);
                bytes = buffer.ToArray();
            }

            string key = entry.FullName[..^".npy".Length];
            byte[]? replacement = replace(key, bytes);
            if (replacement is null) continue;
            using var output = target.CreateEntry(entry.FullName, level).Open();
            output.Write(replacement);
        }
    }

    public static byte[] Float32Npy(float[] data, long[] shape)
    {
        using var stream = new MemoryStream();
        Npy.WriteFloat32(stream, data, shape);
        return stream.ToArray();
    }
}
