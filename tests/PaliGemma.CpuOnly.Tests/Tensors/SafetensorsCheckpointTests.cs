using System.Text;
using PaliGemma.CpuOnly.Tensors;

namespace PaliGemma.CpuOnly.Tests.Tensors;

public sealed class SafetensorsCheckpointTests
{
    private static string TinyFolder => Path.Combine(TestPaths.Golden, "tiny-mqa-56");
    private static string ShardedFolder => Path.Combine(TinyFolder, "sharded");
    private static string BF16Folder => Path.Combine(TinyFolder, "bf16");

    private static byte[] Bytes(float value) => BitConverter.GetBytes(value);

    /// <summary>Writes a two-shard checkpoint (a, b in shard 1; c in shard 2) and returns the index text it wrote.</summary>
    private static string WriteTwoShards(TempDirectory temp, string? indexOverride = null)
    {
        var first = new SafetensorsWriter();
        first.Add("a", DType.F32, [1], Bytes(1f));
        first.Add("b", DType.F32, [1], Bytes(2f));
        first.WriteTo(temp.File("model-00001-of-00002.safetensors"));
        var second = new SafetensorsWriter();
        second.Add("c", DType.F32, [1], Bytes(3f));
        second.WriteTo(temp.File("model-00002-of-00002.safetensors"));

        string index = indexOverride ?? """
            {"metadata": {"total_size": 12},
             "weight_map": {"a": "model-00001-of-00002.safetensors",
                            "b": "model-00001-of-00002.safetensors",
                            "c": "model-00002-of-00002.safetensors"}}
            """;
        // Encoding.UTF8 writes a byte order mark, as some Windows editors do; the loader must accept it.
        File.WriteAllText(temp.File(SafetensorsCheckpoint.IndexFileName), index, Encoding.UTF8);
        return index;
    }

    [Fact]
    public void Open_SingleFileGoldenFolder()
    {
        using var checkpoint = SafetensorsCheckpoint.Open(TinyFolder);
        Assert.Equal(Path.GetFullPath(TinyFolder), checkpoint.Directory);
        Assert.Equal(Path.Combine(checkpoint.Directory, "model.safetensors"), checkpoint.LayoutFile);
        Assert.Single(checkpoint.Files);
        Assert.Equal(checkpoint.Files[0].TensorNames, checkpoint.TensorNames);
        var embed = checkpoint.Get("language_model.model.embed_tokens.weight");
        Assert.Equal(DType.F32, embed.DType);
        Assert.Equal([2304L, 64L], embed.Shape);
    }

    [Fact]
    public void Open_ShardedGoldenFolder_HoldsTensorsByteIdenticalToSingleFile()
    {
        using var single = SafetensorsCheckpoint.Open(TinyFolder);
        using var sharded = SafetensorsCheckpoint.Open(ShardedFolder);

        Assert.EndsWith(SafetensorsCheckpoint.IndexFileName, sharded.LayoutFile);
        Assert.Equal(2, sharded.Files.Count);
        Assert.Equal(single.TensorNames.Order(StringComparer.Ordinal), sharded.TensorNames.Order(StringComparer.Ordinal));
        var shardsUsed = new HashSet<string>();
        foreach (string name in single.TensorNames)
        {
            Assert.True(sharded.Contains(name));
            var expected = single.Get(name);
            var actual = sharded.Get(name);
            Assert.Equal(expected.DType, actual.DType);
            Assert.Equal(expected.Shape, actual.Shape);
            Assert.True(expected.Bytes.SequenceEqual(actual.Bytes), name);
            shardsUsed.Add(Path.GetFileName(actual.Source));
        }
        Assert.Equal(["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"], shardsUsed.Order());
    }

    [Fact]
    public void Open_BF16GoldenFolder_SameNamesAndShapesAsF32()
    {
        using var f32 = SafetensorsCheckpoint.Open(TinyFolder);
        using var bf16 = SafetensorsCheckpoint.Open(BF16Folder);
        foreach (string name in f32.TensorNames)
        {
            var expected = f32.Get(name);
            var actual = bf16.Require(name, expected.Shape);
            Assert.Equal(DType.BF16, actual.DType);
            Assert.Equal(expected.ByteLength / 2, actual.ByteLength);
        }
    }

    [Fact]
    public void Open_FolderWithOneOtherSafetensorsFile_UsesIt()
    {
        using var temp = new TempDirectory();
        var writer = new SafetensorsWriter();
        writer.Add("w", DType.F32, [1], Bytes(5f));
        writer.WriteTo(temp.File("weights.safetensors"));

        using var checkpoint = SafetensorsCheckpoint.Open(temp.Path);
        Assert.EndsWith("weights.safetensors", checkpoint.LayoutFile);
        Assert.Equal(5f, checkpoint.Get("w").ToFloatArray()[0]);
    }

    [Fact]
    public void Open_FolderWithSeveralSafetensorsFilesAndNoIndex_ThrowsNamingFolder()
    {
        using var temp = new TempDirectory();
        WriteTwoShards(temp);
        File.Delete(temp.File(SafetensorsCheckpoint.IndexFileName));

        var e = Assert.Throws<InvalidDataException>(() => SafetensorsCheckpoint.Open(temp.Path));
        Assert.Contains(temp.Path, e.Message);
        Assert.Contains("model-00002-of-00002.safetensors", e.Message);
    }

    [Fact]
    public void Open_FolderWithoutSafetensors_ThrowsFileNotFoundNamingFolder()
    {
        using var temp = new TempDirectory();
        File.WriteAllText(temp.File("config.json"), "{}");
        var e = Assert.Throws<FileNotFoundException>(() => SafetensorsCheckpoint.Open(temp.Path));
        Assert.Contains(temp.Path, e.Message);
        Assert.Contains("model.safetensors", e.Message);
    }

    [Fact]
    public void Open_MissingFolder_ThrowsDirectoryNotFoundNamingIt()
    {
        using var temp = new TempDirectory();
        string missing = Path.Combine(temp.Path, "nope");
        var e = Assert.Throws<DirectoryNotFoundException>(() => SafetensorsCheckpoint.Open(missing));
        Assert.Contains(missing, e.Message);
    }

    [Fact]
    public void Open_WrittenShards_ResolveEachTensorToItsShard()
    {
        using var temp = new TempDirectory();
        WriteTwoShards(temp);
        using var checkpoint = SafetensorsCheckpoint.Open(temp.Path);
        Assert.Equal(["a", "b", "c"], checkpoint.TensorNames);
        Assert.Equal(3f, checkpoint.Get("c").ToFloatArray()[0]);
        Assert.EndsWith("model-00002-of-00002.safetensors", checkpoint.Get("c").Source);
        Assert.EndsWith("model-00001-of-00002.safetensors", checkpoint.Get("a").Source);
    }

    [Fact]
    public void Open_IndexNamingMissingShard_ThrowsFileNotFoundNamingIndexShardAndTensor()
    {
        using var temp = new TempDirectory();
        WriteTwoShards(temp, """{"weight_map": {"a": "model-00001-of-00002.safetensors", "b": "model-00001-of-00002.safetensors", "c": "model-00003-of-00003.safetensors"}}""");
        var e = Assert.Throws<FileNotFoundException>(() => SafetensorsCheckpoint.Open(temp.Path));
        Assert.Contains(SafetensorsCheckpoint.IndexFileName, e.Message);
        Assert.Contains("'model-00003-of-00003.safetensors'", e.Message);
        Assert.Contains("'c'", e.Message);
    }

    [Fact]
    public void Open_IndexNamingTensorTheShardLacks_ThrowsNamingTensorAndShard()
    {
        using var temp = new TempDirectory();
        WriteTwoShards(temp, """{"weight_map": {"a": "model-00001-of-00002.safetensors", "b": "model-00001-of-00002.safetensors", "c": "model-00002-of-00002.safetensors", "d": "model-00002-of-00002.safetensors"}}""");
        var e = Assert.Throws<InvalidDataException>(() => SafetensorsCheckpoint.Open(temp.Path));
        Assert.Contains(SafetensorsCheckpoint.IndexFileName, e.Message);
        Assert.Contains("tensor 'd' is mapped to 'model-00002-of-00002.safetensors'", e.Message);
    }

    [Fact]
    public void Open_TensorInTwoShards_ThrowsNamingBothShards()
    {
        using var temp = new TempDirectory();
        WriteTwoShards(temp);
        var second = new SafetensorsWriter();
        second.Add("c", DType.F32, [1], Bytes(3f));
        second.Add("a", DType.F32, [1], Bytes(1f));
        second.WriteTo(temp.File("model-00002-of-00002.safetensors"));

        var e = Assert.Throws<InvalidDataException>(() => SafetensorsCheckpoint.Open(temp.Path));
        Assert.Contains("tensor 'a' is in two shards", e.Message);
        Assert.Contains("model-00001-of-00002.safetensors", e.Message);
        Assert.Contains("model-00002-of-00002.safetensors", e.Message);
    }

    [Fact]
    public void Open_ShardTensorMissingFromIndex_Throws()
    {
        using var temp = new TempDirectory();
        WriteTwoShards(temp, """{"weight_map": {"a": "model-00001-of-00002.safetensors", "c": "model-00002-of-00002.safetensors"}}""");
        var e = Assert.Throws<InvalidDataException>(() => SafetensorsCheckpoint.Open(temp.Path));
        Assert.Contains("tensor 'b'", e.Message);
        Assert.Contains("does not list it", e.Message);
    }

    [Theory]
    [InlineData("""{"weight_map": {"a": "model-00001-of-00002.safetensors",""", "not a valid safetensors index")]
    [InlineData("""{"metadata": {}}""", "no weight_map")]
    [InlineData("""{"weight_map": {}}""", "no weight_map")]
    [InlineData("""{"weight_map": {"a": "x.safetensors", "a": "y.safetensors"}}""", "not a valid safetensors index")]
    [InlineData("""{"weight_map": {"a": 3}}""", "not a valid safetensors index")]
    [InlineData("""{"weight_map": {"a": null}}""", "'a' has no shard")]
    [InlineData("""{"weight_map": {"a": "../model-00001-of-00002.safetensors"}}""", "must be a file name")]
    public void Open_MalformedIndex_ThrowsNamingIndex(string index, string fragment)
    {
        using var temp = new TempDirectory();
        WriteTwoShards(temp, index);
        var e = Assert.Throws<InvalidDataException>(() => SafetensorsCheckpoint.Open(temp.Path));
        Assert.Contains(SafetensorsCheckpoint.IndexFileName, e.Message);
        Assert.Contains(fragment, e.Message);
    }

    [Fact]
    public void Open_CorruptShard_ReportsTheShardFile()
    {
        using var temp = new TempDirectory();
        WriteTwoShards(temp);
        File.WriteAllBytes(temp.File("model-00002-of-00002.safetensors"), [1, 2, 3]);
        var e = Assert.Throws<InvalidDataException>(() => SafetensorsCheckpoint.Open(temp.Path));
        Assert.Contains("model-00002-of-00002.safetensors", e.Message);
    }

    [Fact]
    public void Get_MissingTensor_ThrowsNamingTensorAndFolder()
    {
        using var checkpoint = SafetensorsCheckpoint.Open(ShardedFolder);
        var e = Assert.Throws<KeyNotFoundException>(() => checkpoint.Get("vision_tower.missing"));
        Assert.Contains("'vision_tower.missing'", e.Message);
        Assert.Contains(checkpoint.Directory, e.Message);
        Assert.Contains(SafetensorsCheckpoint.IndexFileName, e.Message);
        Assert.False(checkpoint.TryGet("vision_tower.missing", out _));
    }

    [Fact]
    public void Require_MatchingShape_ReturnsTensor()
    {
        using var checkpoint = SafetensorsCheckpoint.Open(TinyFolder);
        var tensor = checkpoint.Require("language_model.model.embed_tokens.weight", [2304, 64]);
        Assert.Equal(2304L * 64 * 4, tensor.ByteLength);
    }

    [Fact]
    public void Require_ShapeMismatch_MessageNamesFolderTensorFileAndBothShapes()
    {
        using var checkpoint = SafetensorsCheckpoint.Open(ShardedFolder);
        const string name = "language_model.model.embed_tokens.weight";
        string file = Path.GetFileName(checkpoint.Get(name).Source);
        var e = Assert.Throws<InvalidDataException>(() => checkpoint.Require(name, [2304, 65]));
        Assert.Equal($"'{checkpoint.Directory}': tensor '{name}' in '{file}' has shape [2304, 64] but [2304, 65] is expected", e.Message);

        var rank = Assert.Throws<InvalidDataException>(() => checkpoint.Require(name, [2304 * 64]));
        Assert.Contains("but [147456] is expected", rank.Message);
    }

    [Fact]
    public void Require_MissingTensor_MessageNamesExpectedShape()
    {
        using var checkpoint = SafetensorsCheckpoint.Open(TinyFolder);
        var e = Assert.Throws<InvalidDataException>(() => checkpoint.Require("lm_head.weight", [2304, 64]));
        Assert.Equal($"'{checkpoint.Directory}': tensor 'lm_head.weight' is missing (expected shape [2304, 64])", e.Message);
    }

    [Fact]
    public void Require_NonFloatDType_RejectedOnlyWhenFloatOnly()
    {
        using var temp = new TempDirectory();
        var writer = new SafetensorsWriter();
        writer.Add("ids", DType.I64, [2], new byte[16]);
        writer.WriteTo(temp.File("model.safetensors"));
        using var checkpoint = SafetensorsCheckpoint.Open(temp.Path);

        var e = Assert.Throws<InvalidDataException>(() => checkpoint.Require("ids", [2]));
        Assert.Contains("tensor 'ids' in 'model.safetensors' has dtype I64", e.Message);
        Assert.Equal(DType.I64, checkpoint.Require("ids", [2], floatOnly: false).DType);
    }
}
